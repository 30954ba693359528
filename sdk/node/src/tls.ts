// The platform's TLS identity (server key and self-signed certificate, created once and reused so the pin
// never changes) and the fingerprints both ends go by: the server pin and the agent id.

import 'reflect-metadata';
import { createHash, createPrivateKey, createPublicKey, generateKeyPairSync, webcrypto, X509Certificate } from 'node:crypto';
import { isIP } from 'node:net';
import { join } from 'node:path';
import * as x509 from '@peculiar/x509';

import { readIfExists, writeFileAtomic } from './files.js';

/** File name of the server's private key in the state directory. */
export const KEY_FILE = 'server.key';
/** File name of the server's certificate in the state directory. */
export const CERT_FILE = 'server.crt';
/** Names every generated server certificate covers, before `hostnames`. */
export const DEFAULT_NAMES: readonly string[] = ['localhost', '127.0.0.1', '::1'];
const CERT_VALIDITY_DAYS = 3653;

/** The platform's own key and certificate, instead of the generated ones. */
export interface TlsOptions {
  /** The private key, PEM. */
  key: string | Buffer;
  /** The certificate (chain), PEM: the first certificate's key must be `key`. */
  cert: string | Buffer;
  /** Intermediate CA certificates to present with `cert`, PEM. */
  ca?: string | Buffer;
}

/** What the HTTPS server presents, and its pin. */
export interface ServerIdentity {
  key: string | Buffer;
  cert: string | Buffer;
  ca?: string | Buffer;
  /** Lowercase hex SHA-256 of the server key's SubjectPublicKeyInfo. */
  pin: string;
}

/** Lowercase hex SHA-256 of a DER SubjectPublicKeyInfo. */
export function spkiFingerprint(spkiDer: Buffer): string {
  return createHash('sha256').update(spkiDer).digest('hex');
}

/** The agent id of a client certificate (DER): the fingerprint of its public key. */
export function agentIdOf(certDer: Buffer): string {
  const cert = new X509Certificate(certDer);
  return spkiFingerprint(cert.publicKey.export({ type: 'spki', format: 'der' }));
}

/** The identity from the platform's own key and certificate. */
export function identityFromOptions(tls: TlsOptions): ServerIdentity {
  const key = createPrivateKey(tls.key);
  const cert = new X509Certificate(tls.cert);
  const fromKey = createPublicKey(key).export({ type: 'spki', format: 'der' });
  const fromCert = cert.publicKey.export({ type: 'spki', format: 'der' });
  if (!fromKey.equals(fromCert)) throw new Error('tls.cert is not the certificate of tls.key');
  return { key: tls.key, cert: tls.cert, ...(tls.ca !== undefined ? { ca: tls.ca } : {}), pin: spkiFingerprint(fromKey) };
}

/**
 * Loads `server.key` and `server.crt` from `stateDir`, creating them when missing: an ECDSA
 * P-256 key (PKCS#8 PEM, 0600) kept forever, and a self-signed certificate (10 years) for
 * {@link DEFAULT_NAMES} and `hostnames`, re-issued with the same key when it is missing, does
 * not match the key or does not cover a name.
 */
export async function loadOrCreateIdentity(stateDir: string, hostnames: readonly string[]): Promise<ServerIdentity> {
  const names = [...DEFAULT_NAMES];
  for (const h of hostnames) {
    if (!/^[A-Za-z0-9.-]{1,253}$/.test(h) && isIP(h) === 0) throw new Error(`hostname ${JSON.stringify(h)} is not a DNS name or IP address`);
    if (!names.includes(h)) names.push(h);
  }
  const keyPath = join(stateDir, KEY_FILE);
  const certPath = join(stateDir, CERT_FILE);
  let keyPem = await readIfExists(keyPath, 'utf8');
  if (keyPem === undefined) {
    const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'prime256v1' });
    keyPem = privateKey.export({ type: 'pkcs8', format: 'pem' }).toString();
    await writeFileAtomic(keyPath, keyPem, 0o600);
  }
  const key = createPrivateKey(keyPem);
  const spki = createPublicKey(key).export({ type: 'spki', format: 'der' });
  const pin = spkiFingerprint(spki);

  const certPem = await readIfExists(certPath, 'utf8');
  if (certPem !== undefined && certUsable(certPem, spki, names)) return { key: keyPem, cert: certPem, pin };

  const pkcs8 = key.export({ type: 'pkcs8', format: 'der' });
  const algorithm = { name: 'ECDSA', namedCurve: 'P-256', hash: 'SHA-256' };
  const subtle = webcrypto.subtle;
  const keys = {
    privateKey: await subtle.importKey('pkcs8', pkcs8, algorithm, false, ['sign']),
    publicKey: await subtle.importKey('spki', spki, algorithm, true, ['verify']),
  };
  const notBefore = new Date(Date.now() - 60_000);
  const notAfter = new Date(notBefore.getTime() + CERT_VALIDITY_DAYS * 86_400_000);
  const cert = await x509.X509CertificateGenerator.createSelfSigned(
    {
      serialNumber: createHash('sha256').update(spki).update(String(Date.now())).digest('hex').slice(0, 30).replace(/^[89a-f]/, '1'),
      name: 'CN=bridge platform',
      notBefore,
      notAfter,
      signingAlgorithm: algorithm,
      keys,
      extensions: [
        new x509.BasicConstraintsExtension(false, undefined, true),
        new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
        new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.serverAuth]),
        new x509.SubjectAlternativeNameExtension(
          names.map((n) => (isIP(n) !== 0 ? { type: 'ip' as const, value: n } : { type: 'dns' as const, value: n })),
        ),
      ],
    },
    webcrypto as unknown as Crypto,
  );
  const pem = cert.toString('pem') + '\n';
  await writeFileAtomic(certPath, pem, 0o600);
  return { key: keyPem, cert: pem, pin };
}

function certUsable(pem: string, spki: Buffer, names: readonly string[]): boolean {
  try {
    const cert = new X509Certificate(pem);
    if (!cert.publicKey.export({ type: 'spki', format: 'der' }).equals(spki)) return false;
    if (new Date(cert.validTo).getTime() < Date.now() + 86_400_000) return false;
    return names.every((n) => (isIP(n) !== 0 ? cert.checkIP(n) !== undefined : cert.checkHost(n) !== undefined));
  } catch {
    return false;
  }
}
