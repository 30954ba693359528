// A client playing an agent over a WebSocket with its own client certificate (so the Platform
// derives its id as for a real agent): for tests that need an agent to say what a real one would
// not, such as a forged audit chain or a hostile frame.

import 'reflect-metadata';
import assert from 'node:assert/strict';
import { createHash, generateKeyPairSync, webcrypto, createPublicKey } from 'node:crypto';
import * as x509 from '@peculiar/x509';
import WebSocket from 'ws';

/** A client certificate and key, and the agent id the platform derives from it. */
export interface Identity {
  key: string;
  cert: string;
  id: string;
}

/** A fresh identity (P-256 key, self-signed certificate). */
export async function identity(): Promise<Identity> {
  const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'prime256v1' });
  const alg = { name: 'ECDSA', namedCurve: 'P-256', hash: 'SHA-256' };
  const spki = createPublicKey(privateKey).export({ type: 'spki', format: 'der' });
  const keys = {
    privateKey: await webcrypto.subtle.importKey('pkcs8', privateKey.export({ type: 'pkcs8', format: 'der' }), alg, false, ['sign']),
    publicKey: await webcrypto.subtle.importKey('spki', spki, alg, true, ['verify']),
  };
  const cert = await x509.X509CertificateGenerator.createSelfSigned(
    { serialNumber: '01', name: 'CN=fake agent', notBefore: new Date(Date.now() - 60_000), notAfter: new Date(Date.now() + 86_400_000), signingAlgorithm: alg, keys },
    webcrypto as unknown as Crypto,
  );
  return {
    key: privateKey.export({ type: 'pkcs8', format: 'pem' }).toString(),
    cert: cert.toString('pem'),
    id: createHash('sha256').update(spki).digest('hex'),
  };
}

/** A message as JSON. */
export type Msg = Record<string, unknown>;

/** A client playing an agent. */
export class Fake {
  private readonly queue: Msg[] = [];
  private wake: (() => void) | undefined;
  readonly closed: Promise<{ code: number; reason: string }>;

  private constructor(readonly ws: WebSocket) {
    ws.on('message', (data, isBinary) => {
      this.queue.push(isBinary ? { binary: data as Buffer } : (JSON.parse(data.toString()) as Msg));
      this.wake?.();
    });
    this.closed = new Promise((resolve) => ws.on('close', (code, reason) => resolve({ code, reason: reason.toString() })));
  }

  /** Opens a connection; resolves with the client, or with the HTTP refusal. */
  static open(url: string, id: Identity | undefined, token?: string): Promise<Fake | { status: number; refusal: string | undefined }> {
    const ws = new WebSocket(url, {
      ...(id !== undefined ? { key: id.key, cert: id.cert } : {}),
      rejectUnauthorized: false,
      headers: token !== undefined ? { Authorization: `Bearer ${token}` } : {},
      perMessageDeflate: false,
    });
    return new Promise((resolve, reject) => {
      ws.on('open', () => resolve(new Fake(ws)));
      ws.on('unexpected-response', (_req, res) => {
        resolve({ status: res.statusCode ?? 0, refusal: res.headers['x-bridge-refusal'] as string | undefined });
        res.resume();
        ws.terminate();
      });
      ws.on('error', reject);
    });
  }

  send(m: Msg | string): void {
    this.ws.send(typeof m === 'string' ? m : JSON.stringify(m));
  }

  /** The next message (at most `ms`). */
  async next(ms = 5000): Promise<Msg> {
    const end = Date.now() + ms;
    while (this.queue.length === 0) {
      const left = end - Date.now();
      if (left <= 0) throw new Error('no message from the platform');
      await new Promise<void>((r) => {
        const t = setTimeout(r, left);
        this.wake = () => {
          clearTimeout(t);
          r();
        };
      });
    }
    return this.queue.shift() as Msg;
  }

  /** The error the platform answers `frame` with. */
  async errorFor(frame: Msg | string): Promise<Msg> {
    this.send(frame);
    const m = await this.next();
    assert.equal(m.type, 'error', JSON.stringify(m));
    return m;
  }

  hello(id: string, versions: number[] = [2, 1]): void {
    this.send({ type: 'hello', versions, agent_id: id, agent_version: 'fake' });
  }
}

/** The client, failing the test when the upgrade was refused. */
export function opened(f: Fake | { status: number }): Fake {
  assert.ok(f instanceof Fake, `the upgrade was refused: ${JSON.stringify(f)}`);
  return f;
}
