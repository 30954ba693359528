// The platform's own certificate (`tls`): a server certificate issued by the platform's CA,
// which a real agent verifies with `--ca-file` instead of a pin.

import 'reflect-metadata';
import assert from 'node:assert/strict';
import { createHash, webcrypto, X509Certificate } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import * as x509 from '@peculiar/x509';

import { Platform, PlatformError } from '../dist/index.js';
import { Agent, tempDir, within } from './support.js';

x509.cryptoProvider.set(webcrypto as unknown as Crypto);
const ALG = { name: 'ECDSA', namedCurve: 'P-256', hash: 'SHA-256' };
const DAY = 86_400_000;

async function pkcs8Pem(key: CryptoKey): Promise<string> {
  const der = Buffer.from(await webcrypto.subtle.exportKey('pkcs8', key));
  return `-----BEGIN PRIVATE KEY-----\n${der.toString('base64').replace(/.{64}/g, '$&\n')}\n-----END PRIVATE KEY-----\n`;
}

/** A CA, and a server certificate for 127.0.0.1 issued by it. */
async function issued(): Promise<{ caPem: string; keyPem: string; certPem: string }> {
  const caKeys = (await webcrypto.subtle.generateKey(ALG, true, ['sign', 'verify'])) as CryptoKeyPair;
  const ca = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: '01',
    name: 'CN=platform test CA',
    notBefore: new Date(Date.now() - DAY),
    notAfter: new Date(Date.now() + 30 * DAY),
    keys: caKeys,
    signingAlgorithm: ALG,
    extensions: [
      new x509.BasicConstraintsExtension(true, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
    ],
  });
  const keys = (await webcrypto.subtle.generateKey(ALG, true, ['sign', 'verify'])) as CryptoKeyPair;
  const cert = await x509.X509CertificateGenerator.create({
    serialNumber: '02',
    subject: 'CN=127.0.0.1',
    issuer: ca.subject,
    notBefore: new Date(Date.now() - DAY),
    notAfter: new Date(Date.now() + 30 * DAY),
    signingKey: caKeys.privateKey,
    publicKey: keys.publicKey,
    signingAlgorithm: ALG,
    extensions: [
      new x509.BasicConstraintsExtension(false, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
      new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.serverAuth]),
      new x509.SubjectAlternativeNameExtension([
        { type: 'ip', value: '127.0.0.1' },
        { type: 'dns', value: 'localhost' },
      ]),
    ],
  });
  return { caPem: ca.toString('pem'), keyPem: await pkcs8Pem(keys.privateKey), certPem: cert.toString('pem') };
}

describe("the platform's own certificate", { timeout: 60_000 }, () => {
  const cleanup: Array<() => Promise<void>> = [];
  after(async () => {
    for (const c of cleanup.reverse()) await c();
  });

  it('is presented to agents, which verify it against the CA file; the pin is its key', async () => {
    const { caPem, keyPem, certPem } = await issued();
    const platform = await Platform.start({ listen: '127.0.0.1:0', stateDir: join(tempDir(), 'platform'), tls: { key: keyPem, cert: certPem } });
    cleanup.push(() => platform.close());
    const spki = new X509Certificate(certPem).publicKey.export({ type: 'spki', format: 'der' });
    assert.equal(platform.pin, createHash('sha256').update(spki).digest('hex'));
    const caFile = join(tempDir(), 'ca.pem');
    writeFileSync(caFile, caPem);
    const state = join(tempDir('bridge-agent-'), 'state');
    const agent = new Agent(state, ['--server', platform.url, '--ca-file', caFile, '--token', await platform.issueToken(), '--reconnect-max-secs', '1']);
    cleanup.push(() => agent.kill());
    const id = await agent.id();
    await within(30_000, 'the agent to connect', platform.waitForAgent(id, { timeoutMs: 30_000 }));
    assert.deepEqual(await platform.handlers(id), []);
  });

  it('is refused when the key is not the certificate’s', async () => {
    const a = await issued();
    const b = await issued();
    await assert.rejects(
      Platform.start({ listen: '127.0.0.1:0', stateDir: join(tempDir(), 'platform'), tls: { key: a.keyPem, cert: b.certPem } }),
      (e: unknown) => e instanceof Error && /not the certificate of tls.key/.test(e.message) && (!(e instanceof PlatformError) || e.code === 'invalid'),
    );
  });
});
