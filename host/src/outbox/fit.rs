//! Fitting a result into one text frame: the platform refuses frames over
//! [`bridge_protocol::MAX_TEXT_BYTES`] or deeper than [`bridge_protocol::MAX_DEPTH`], and measuring one.

use bridge_protocol::RunResult;

/// Makes a result fit in one text frame: the platform refuses frames over
/// [`bridge_protocol::MAX_TEXT_BYTES`] or nested deeper than [`bridge_protocol::MAX_DEPTH`], and
/// a result it refuses is a result lost. First `output` goes (it repeats stdout, parsed), then
/// stdout and stderr are cut (marked truncated; their total byte counts stay exact).
pub fn fit_to_frame(result: &mut RunResult, id: &str, task_id: &str) -> usize {
    let size = |r: &RunResult| measure_result(r, id, task_id);
    let (len, depth) = size(result);
    if len <= bridge_protocol::MAX_TEXT_BYTES && depth <= bridge_protocol::MAX_DEPTH {
        return len;
    }
    if !result.output.is_null() {
        result.output = serde_json::Value::Null;
        let note = "the output was too large or too deep for one message; it is in `stdout`";
        result.error = Some(match result.error.take() {
            Some(e) => format!("{e}; {note}"),
            None => note.to_string(),
        });
    }
    // Escaping can grow text up to 6×; halve the streams until the frame fits.
    while size(result).0 > bridge_protocol::MAX_TEXT_BYTES {
        for (text, flag) in [
            (&mut result.stdout, &mut result.truncated.stdout),
            (&mut result.stderr, &mut result.truncated.stderr),
        ] {
            if text.len() > 1024 {
                let mut cut = text.len() / 2;
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                text.truncate(cut);
                *flag = true;
            }
        }
        if result.stdout.len() <= 1024 && result.stderr.len() <= 1024 {
            // Only the error text can still be large; cut it too.
            if let Some(e) = result.error.as_mut() {
                let mut cut = e.len().min(4096);
                while !e.is_char_boundary(cut) {
                    cut -= 1;
                }
                e.truncate(cut);
            }
            break;
        }
    }
    size(result).0
}

/// The length and nesting depth of the `result` message carrying `result`, as
/// `encode(&AgentMessage::Result { .. })` would write it, without copying the result or
/// keeping the text.
pub fn measure_result(result: &RunResult, id: &str, task_id: &str) -> (usize, usize) {
    /// `AgentMessage::Result`, borrowed: the same JSON.
    #[derive(serde::Serialize)]
    #[serde(tag = "type", rename = "result")]
    struct View<'a> {
        id: &'a str,
        task_id: &'a str,
        result: &'a RunResult,
    }
    let mut m = bridge_protocol::codec::Measure::default();
    serde_json::to_writer(
        &mut m,
        &View {
            id,
            task_id,
            result,
        },
    )
    .expect("results always serialize");
    (m.len(), m.max_depth())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bridge_protocol::{AgentMessage, Status};

    #[test]
    fn oversized_results_are_cut_to_fit_one_frame() {
        let mut r = RunResult::refused(Status::Ok, "x");
        r.error = None;
        r.stdout = "\u{1}".repeat(900_000); // escapes to ~5.4 MB of JSON
        r.stderr = "é".repeat(400_000);
        r.output = serde_json::json!({"big": "y".repeat(600_000)});
        let _ = fit_to_frame(&mut r, "run-1", "task-1");
        let msg = AgentMessage::Result {
            id: "run-1".into(),
            task_id: "task-1".into(),
            result: r.clone(),
        };
        let text = bridge_protocol::codec::encode(&msg);
        assert!(
            text.len() <= bridge_protocol::MAX_TEXT_BYTES,
            "{}",
            text.len()
        );
        assert!(r.output.is_null());
        assert!(r.truncated.stdout && r.truncated.stderr);
        assert!(r.error.unwrap().contains("too large"));
    }

    #[test]
    fn a_result_is_measured_as_its_message_encodes() {
        use bridge_protocol::codec::{encode, json_depth};
        let mut r = RunResult::refused(Status::Error, "quote \" backslash \\ ] } done");
        r.stdout = "line\n\u{1}[[{\"é\"".into();
        r.output = serde_json::json!({"a": [1, {"b": "]]]"}], "c": null});
        for (id, task_id) in [("run-1", "task-1"), ("\"odd\" [id]", "t\\")] {
            let text = encode(&AgentMessage::Result {
                id: id.into(),
                task_id: task_id.into(),
                result: r.clone(),
            });
            assert_eq!(
                measure_result(&r, id, task_id),
                (text.len(), json_depth(&text)),
                "{text}"
            );
        }
    }

    #[test]
    fn too_deep_output_is_dropped_and_small_results_are_untouched() {
        let mut deep = RunResult::refused(Status::Ok, "x");
        deep.error = None;
        let nested = format!("{}1{}", "[".repeat(70), "]".repeat(70));
        deep.output = serde_json::from_str(&nested).unwrap();
        let _ = fit_to_frame(&mut deep, "i", "t");
        assert!(deep.output.is_null());

        let mut small = RunResult::refused(Status::Ok, "x");
        small.output = serde_json::json!({"a": 1});
        let before = small.clone();
        let _ = fit_to_frame(&mut small, "i", "t");
        assert_eq!(small, before);
    }
}
