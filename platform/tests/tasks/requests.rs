//! Control requests matched to the agent's answers by message id (`cancel`, the handler
//! commands), and bad `run` and `install_handler` requests refused before reaching the agent.

use super::*;

fn handler(name: &str, sha: &str) -> Value {
    json!({"name": name, "file_sha256": sha, "code_sha256": "ef".repeat(32), "installed_at": "2025-11-25T05:53:20Z", "key": "8f2c0a7e".repeat(4)})
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_and_handler_requests_are_matched_by_message_id() {
    within(90, async {
        let dir = tempfile::tempdir().unwrap();
        let serve = Platform::start(&dir.path().join("state"));
        let agent = Identity::new();
        let (mut ws, _) = session(&serve, &agent, Some(&serve.token())).await;

        // Two requests at once, answered in the other order; a reply with an unknown id is
        // ignored.
        let cancel = serve.control().background(&json!({"cmd": "cancel", "agent": agent.id, "task_id": "task-9"}),
        );
        let cancel_msg = recv(&mut ws).await;
        assert_eq!(cancel_msg["type"], "cancel", "{cancel_msg}");
        assert_eq!(cancel_msg["task_id"], "task-9");
        let list = serve.control().background(&json!({"cmd": "handlers", "agent": agent.id}));
        let list_msg = recv(&mut ws).await;
        assert_eq!(list_msg["type"], "list_handlers", "{list_msg}");
        assert_ne!(list_msg["id"], cancel_msg["id"]);
        send(
            &mut ws,
            json!({"type": "cancel_reply", "id": "cancel-0000000000000000", "task_id": "task-9", "outcome": "unknown"}),
        )
        .await;
        let listed = json!([handler("hello", &"ab".repeat(32))]);
        send(
            &mut ws,
            json!({"type": "handlers", "id": list_msg["id"], "handlers": listed}),
        )
        .await;
        send(
            &mut ws,
            json!({"type": "cancel_reply", "id": cancel_msg["id"], "task_id": "task-9", "outcome": "cancelling"}),
        )
        .await;
        let r = response_of(list).await;
        assert_eq!(r, json!({"ok": true, "handlers": listed}));
        let r = response_of(cancel).await;
        assert_eq!(
            r,
            json!({"ok": true, "task_id": "task-9", "outcome": "cancelling"})
        );

        // install-handler: the agent asks for the module bytes first, as for a run.
        let module: Vec<u8> = b"\0asm\x01\0\0\0handler".to_vec();
        let sha = sha256_hex(&module);
        let module_path = dir.path().join("hello.wasm");
        std::fs::write(&module_path, &module).unwrap();
        let sig_path = dir.path().join("hello.wasm.sig");
        std::fs::write(&sig_path, b"\x01envelope").unwrap();
        let child = bridgectl(
            &serve,
            &[
                "install-handler",
                "--agent",
                &agent.id,
                "--name",
                "hello",
                module_path.to_str().unwrap(),
                "--signature",
                sig_path.to_str().unwrap(),
            ],
        );
        let install = recv(&mut ws).await;
        assert_eq!(install["type"], "install_handler", "{install}");
        assert_eq!(install["name"], "hello");
        assert_eq!(install["file_sha256"], sha.as_str());
        assert_eq!(
            install["signature"],
            base64::engine::general_purpose::STANDARD.encode(b"\x01envelope")
        );
        send(
            &mut ws,
            json!({"type": "need_module", "id": install["id"], "file_sha256": sha}),
        )
        .await;
        match next_frame(&mut ws).await {
            Message::Binary(bytes) => assert_eq!(&bytes[..], &module[..]),
            other => panic!("expected the module bytes, got {other:?}"),
        }
        let listed = json!([handler("hello", &sha)]);
        send(
            &mut ws,
            json!({"type": "handlers", "id": install["id"], "handlers": listed}),
        )
        .await;
        let out = output_of(child).await;
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(stdout_json(&out), listed);

        // A refusal carries the agent's reason (the module is stored now: by hash).
        let refused = serve.control().background(&json!({"cmd": "install_handler", "agent": agent.id, "name": "other", "module_sha256": sha}),
        );
        let install = recv(&mut ws).await;
        assert_eq!(install["name"], "other");
        assert!(install.get("signature").is_none());
        send(
            &mut ws,
            json!({"type": "error", "id": install["id"], "code": "refused", "message": "out_of_scope: the signature names hello, not other"}),
        )
        .await;
        let r = response_of(refused).await;
        assert_eq!(r["ok"], false);
        let error = r["error"].as_str().unwrap();
        assert!(error.contains("refused") && error.contains("out_of_scope"), "{error}");

        // remove-handler and handlers from the command line; not_found is exit 2.
        let child = bridgectl(
            &serve,
            &["remove-handler", "--agent", &agent.id, "--name", "nope"],
        );
        let remove = recv(&mut ws).await;
        assert_eq!(remove["type"], "remove_handler");
        assert_eq!(remove["name"], "nope");
        send(
            &mut ws,
            json!({"type": "error", "id": remove["id"], "code": "not_found", "message": "no handler named nope"}),
        )
        .await;
        let out = output_of(child).await;
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("not_found: no handler named nope"), "{err}");
        let child = bridgectl(
            &serve,
            &["remove-handler", "--agent", &agent.id, "--name", "hello"],
        );
        let remove = recv(&mut ws).await;
        send(
            &mut ws,
            json!({"type": "handlers", "id": remove["id"], "handlers": []}),
        )
        .await;
        let out = output_of(child).await;
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(stdout_json(&out), json!([]));
        let child = bridgectl(&serve, &["handlers", "--agent", &agent.id]);
        let list = recv(&mut ws).await;
        assert_eq!(list["type"], "list_handlers");
        send(
            &mut ws,
            json!({"type": "handlers", "id": list["id"], "handlers": []}),
        )
        .await;
        assert_eq!(stdout_json(&output_of(child).await), json!([]));

        // cancel from the command line.
        let child = bridgectl(
            &serve,
            &["cancel", "--agent", &agent.id, "--task-id", "task-x"],
        );
        let cancel = recv(&mut ws).await;
        send(
            &mut ws,
            json!({"type": "cancel_reply", "id": cancel["id"], "task_id": "task-x", "outcome": "unknown"}),
        )
        .await;
        let out = output_of(child).await;
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(
            stdout_json(&out),
            json!({"task_id": "task-x", "outcome": "unknown"})
        );

        // Requests belong to their connection: a lost connection ends them.
        let list = serve.control().background(&json!({"cmd": "handlers", "agent": agent.id}));
        assert_eq!(recv(&mut ws).await["type"], "list_handlers");
        drop(ws);
        let r = response_of(list).await;
        assert_eq!(r["ok"], false);
        assert!(r["error"].as_str().unwrap().contains("connection"), "{r}");
        until_disconnected(&serve, &agent.id).await;
        let r = serve
            .control().request_async(
                &json!({"cmd": "cancel", "agent": agent.id, "task_id": "t"}).to_string(),
            )
            .await;
        assert!(r["error"].as_str().unwrap().contains("not connected"), "{r}");
        let r = serve
            .control().request_async(&json!({"cmd": "handlers", "agent": "0".repeat(64)}).to_string())
            .await;
        assert!(r["error"].as_str().unwrap().contains("unknown agent"), "{r}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_run_and_install_requests_are_refused_before_reaching_the_agent() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let serve = Platform::start(&dir.path().join("state"));
        let agent = Identity::new();
        let (mut ws, _) = session(&serve, &agent, Some(&serve.token())).await;
        let module = base64::engine::general_purpose::STANDARD.encode(b"\0asm\x01\0\0\0");
        for (request, expected) in [
            (
                json!({"cmd": "run", "agent": agent.id}),
                "exactly one of",
            ),
            (
                json!({"cmd": "run", "agent": agent.id, "module": module, "command": "x"}),
                "exactly one of",
            ),
            (
                json!({"cmd": "run", "agent": agent.id, "command": "x", "signature": "AA=="}),
                "signature",
            ),
            (
                json!({"cmd": "run", "agent": agent.id, "command": "x", "not_after": "tomorrow"}),
                "not_after",
            ),
            (
                json!({"cmd": "run", "agent": agent.id, "file_sha256": "ab".repeat(32)}),
                "no stored module",
            ),
            (
                json!({"cmd": "install_handler", "agent": agent.id, "name": "x", "module_sha256": "cd".repeat(32)}),
                "no stored module",
            ),
            (
                json!({"cmd": "install_handler", "agent": agent.id, "name": "x", "module": "!"}),
                "not base64",
            ),
            (
                json!({"cmd": "result", "task_id": "never"}),
                "no result for task never",
            ),
        ] {
            let r = serve.control().request_async(&request.to_string()).await;
            assert_eq!(r["ok"], false, "{request}: {r}");
            let error = r["error"].as_str().unwrap();
            assert!(error.contains(expected), "{request}: {error}");
        }
        expect_silence(&mut ws, Duration::from_millis(300)).await;
    })
    .await;
}
