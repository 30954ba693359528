// sign.ts against docs/signing.md's test vector and against the real `bridgectl` and
// `bridge-daemon`: the same bytes for the same claims, and each side accepts the other's keys
// and signatures.

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { chmod, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';

import {
  SignError,
  claimsToJson,
  codeSha256,
  fileSha256,
  keyId,
  keyPairFromSeed,
  keygen,
  publicKeyOf,
  sign,
  signWithDetails,
  stripSignatures,
} from '../dist/sign.js';
import type { ClaimsInput } from '../dist/sign.js';

/** A path from the environment, or a failure naming what sets it. */
function envPath(name: string): string {
  const value = process.env[name];
  if (value === undefined || value === '') {
    throw new Error(`${name} is not set: run the suite with \`cargo xtask test-node\` (or set ${name}; see sdk/node/README.md)`);
  }
  return value;
}

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a binary to completion (at most 60 s), without a shell. */
function run(bin: string, args: string[]): Promise<Run> {
  return new Promise((resolve, reject) => {
    execFile(bin, args, { timeout: 60_000, maxBuffer: 16 << 20 }, (error, stdout, stderr) => {
      if (error !== null && typeof error.code !== 'number') {
        reject(new Error(`${bin} ${args.join(' ')}: ${error.message}\n${stderr}`));
        return;
      }
      resolve({ code: error === null ? 0 : (error.code as number), stdout, stderr });
    });
  });
}

/** Runs a binary that must succeed and print one JSON object. */
async function runJson(bin: string, args: string[]): Promise<Record<string, unknown>> {
  const r = await run(bin, args);
  assert.equal(r.code, 0, `${bin} ${args.join(' ')} exited ${r.code}: ${r.stderr}`);
  return JSON.parse(r.stdout) as Record<string, unknown>;
}

/** What `bridgectl sign` calls the hash of the stripped module (`code_sha256`, `module_sha256` before protocol version 2). */
function printedCodeSha(out: Record<string, unknown>): unknown {
  return out['code_sha256'] ?? out['module_sha256'];
}

/** The byte range of the contents of the first section with id `id` (a top-level walk). */
function sectionContents(module: Uint8Array, id: number): [number, number] {
  let pos = 8;
  while (pos < module.length) {
    const sid = module[pos++] as number;
    let size = 0;
    let shift = 0;
    for (;;) {
      const b = module[pos++] as number;
      size += (b & 0x7f) * 2 ** shift;
      shift += 7;
      if ((b & 0x80) === 0) {
        break;
      }
    }
    if (sid === id) {
      return [pos, pos + size];
    }
    pos += size;
  }
  throw new Error(`no section with id ${id}`);
}

const VECTOR = {
  seed: '0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20',
  pem:
    '-----BEGIN PRIVATE KEY-----\n' +
    'MFECAQEwBQYDK2VwBCIEIAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8g\n' +
    'gSEAebVWLo/mVPlAeLES6KmLp5AfhTrmlb7X4OORC60ElmQ=\n' +
    '-----END PRIVATE KEY-----\n',
  publicKey: 'ed25519:ebVWLo_mVPlAeLES6KmLp5AfhTrmlb7X4OORC60ElmQ',
  keyId: '65b60673d6ed884bf01c2c222d82ada0',
  module: '0061736d01000000010401600000030201000a040102000b',
  moduleSha256: 'aaceec3bbac74451e6dcefcead4220538e643fcb1df8009a7c5c3a5afffc5495',
  claims:
    '{"v":1,"name":"hello","version":"1.0.0","issued_at":1764050000,"not_after":null,"capabilities":{"fuel":1000000000}}',
  envelope:
    '42525347' + '01' + '01' + '65b60673d6ed884bf01c2c222d82ada0' + '73000000' +
    '7b2276223a312c226e616d65223a2268656c6c6f222c2276657273696f6e223a22312e302e30222c' +
    '226973737565645f6174223a313736343035303030302c226e6f745f6166746572223a6e756c6c2c' +
    '226361706162696c6974696573223a7b226675656c223a313030303030303030307d7d' +
    '7051a9ded51fde9ca323feca159279f118cf9cf385907ad339c2b08e2995be96' +
    '11f29c5ed4024aadc9d13d3d96dc1b3147abc62db28b5a12d506a75cb1e19b0a',
  sectionHeader: '00de01106272696467652e7369676e6174757265',
};

describe('the docs/signing.md test vector', { timeout: 30_000 }, () => {
  const key = keyPairFromSeed(Buffer.from(VECTOR.seed, 'hex'));
  const module = Buffer.from(VECTOR.module, 'hex');
  const claims: ClaimsInput = { name: 'hello', version: '1.0.0', issuedAt: 1764050000, capabilities: { fuel: 1000000000 } };

  test('keys from the seed 01..20', () => {
    assert.equal(key.privateKey, VECTOR.pem);
    assert.equal(key.publicKey, VECTOR.publicKey);
    assert.equal(key.keyId, VECTOR.keyId);
    assert.equal(keyId(VECTOR.publicKey), VECTOR.keyId);
    assert.equal(keyId(Buffer.from(VECTOR.publicKey.slice(8), 'base64url')), VECTOR.keyId);
    assert.equal(publicKeyOf(VECTOR.pem), VECTOR.publicKey);
  });

  test('claims, envelope and the 249-byte signed module', () => {
    assert.equal(claimsToJson(claims), VECTOR.claims);
    assert.equal(codeSha256(module), VECTOR.moduleSha256);
    const detached = signWithDetails(module, VECTOR.pem, claims, { detached: true });
    assert.equal(detached.bytes.toString('hex'), VECTOR.envelope);
    assert.equal(detached.bytes.length, 205);
    assert.equal(detached.detached, true);
    assert.equal(detached.keyId, VECTOR.keyId);
    assert.equal(detached.codeSha256, VECTOR.moduleSha256);
    assert.equal(detached.fileSha256, VECTOR.moduleSha256, 'detached: the uploaded file is the module itself');
    assert.equal(detached.claimsJson, VECTOR.claims);
    const embedded = signWithDetails(module, VECTOR.pem, claims);
    assert.equal(embedded.bytes.length, 249);
    assert.equal(embedded.bytes.toString('hex'), VECTOR.module + VECTOR.sectionHeader + VECTOR.envelope);
    assert.equal(embedded.envelope.toString('hex'), VECTOR.envelope);
    assert.equal(embedded.codeSha256, VECTOR.moduleSha256);
    assert.equal(codeSha256(embedded.bytes), VECTOR.moduleSha256, 'the signature section is not part of the code hash');
    assert.equal(embedded.fileSha256, fileSha256(embedded.bytes));
    assert.notEqual(embedded.fileSha256, embedded.codeSha256);
    assert.deepEqual(embedded.replacedKeyIds, []);
    assert.deepEqual(stripSignatures(embedded.bytes), module);
    assert.ok(sign(module, VECTOR.pem, claims).equals(embedded.bytes), 'sign() returns the signed module');
  });

  test('a PKCS#8 v1 key (as openssl writes it) signs the same', () => {
    const v1 = Buffer.concat([Buffer.from('302e020100300506032b657004220420', 'hex'), Buffer.from(VECTOR.seed, 'hex')]);
    const pem = `-----BEGIN PRIVATE KEY-----\n${v1.toString('base64')}\n-----END PRIVATE KEY-----\n`;
    assert.equal(sign(module, pem, claims, { detached: true }).toString('hex'), VECTOR.envelope);
  });

  test('re-signing replaces the signature, never accumulates', () => {
    const first = signWithDetails(module, VECTOR.pem, claims).bytes;
    const other = keygen();
    const second = signWithDetails(first, other.privateKey, claims);
    assert.equal(second.bytes.length, 249);
    assert.deepEqual(second.replacedKeyIds, [VECTOR.keyId]);
    assert.equal(second.keyId, other.keyId);
    assert.equal(second.codeSha256, VECTOR.moduleSha256);
    assert.deepEqual(second.bytes.subarray(0, 24), module);
    // A section named bridge.signature whose envelope is broken is replaced too, reported as null.
    const junk = Buffer.concat([module, Buffer.from([0, 18, 16]), Buffer.from('bridge.signature'), Buffer.from([1])]);
    const third = signWithDetails(junk, VECTOR.pem, claims);
    assert.deepEqual(third.replacedKeyIds, [null]);
    assert.equal(third.bytes.toString('hex'), VECTOR.module + VECTOR.sectionHeader + VECTOR.envelope);
  });
});

describe('refusals', { timeout: 30_000 }, () => {
  const module = Buffer.from(VECTOR.module, 'hex');
  const pem = VECTOR.pem;
  const code = (err: unknown): string | undefined => (err instanceof SignError ? err.code : undefined);

  test('claims a verifier would refuse', () => {
    const bad: [string, unknown][] = [
      ['upper-case name', { name: 'Hello' }],
      ['name starting with -', { name: '-x' }],
      ['empty name', { name: '' }],
      ['65-byte name', { name: 'a'.repeat(65) }],
      ['empty version', { name: 'x', version: '' }],
      ['65-byte version', { name: 'x', version: 'v'.repeat(65) }],
      ['control character in version', { name: 'x', version: '1\n' }],
      ['C1 control character in version', { name: 'x', version: '1\u0085' }],
      ['lone surrogate in version', { name: 'x', version: '1\ud800' }],
      ['unknown claims field', { name: 'x', extra: 1 }],
      ['snake_case claims field', { name: 'x', issued_at: 1 }],
      ['unknown capability field', { name: 'x', capabilities: { net: true } }],
      ['snake_case capability field', { name: 'x', capabilities: { memory_bytes: 1 } }],
      ['unknown dir field', { name: 'x', capabilities: { dirs: [{ path: '/d', exec: true }] } }],
      ['relative dir', { name: 'x', capabilities: { dirs: [{ path: 'rel' }] } }],
      ['dir with ..', { name: 'x', capabilities: { dirs: [{ path: '/a/../etc' }] } }],
      ['dir with trailing /', { name: 'x', capabilities: { dirs: [{ path: '/a/' }] } }],
      ['dir with NUL', { name: 'x', capabilities: { dirs: [{ path: '/a\0b' }] } }],
      ['write not a boolean', { name: 'x', capabilities: { dirs: [{ path: '/a', write: 'yes' }] } }],
      ['bad env name', { name: 'x', capabilities: { env: ['A=B'] } }],
      ['env name starting with a digit', { name: 'x', capabilities: { env: ['1A'] } }],
      ['negative fuel', { name: 'x', capabilities: { fuel: -1 } }],
      ['fractional fuel', { name: 'x', capabilities: { fuel: 1.5 } }],
      ['unsafe integer', { name: 'x', capabilities: { fuel: 2 ** 60 } }],
      ['bigint above u64', { name: 'x', capabilities: { fuel: 1n << 64n } }],
      ['fuel as a string', { name: 'x', capabilities: { fuel: '1' } }],
      ['negative issue time', { name: 'x', issuedAt: -1 }],
      ['date before 1970', { name: 'x', issuedAt: new Date(-1000) }],
      ['invalid date', { name: 'x', notAfter: new Date(Number.NaN) }],
      ['claims longer than 64 KiB', { name: 'x', capabilities: { env: Array.from({ length: 7000 }, (_, i) => `VARIABLE_${i}`) } }],
    ];
    for (const [what, claims] of bad) {
      assert.throws(() => sign(module, pem, claims as ClaimsInput), (e) => code(e) === 'invalid_claims', what);
    }
  });

  test('u64 extremes are written exactly', () => {
    const json = claimsToJson({ name: 'x', issuedAt: 0n, notAfter: (1n << 64n) - 1n, capabilities: { fuel: (1n << 64n) - 1n, memoryBytes: Number.MAX_SAFE_INTEGER } });
    assert.equal(
      json,
      '{"v":1,"name":"x","version":"0.0.0","issued_at":0,"not_after":18446744073709551615,"capabilities":{"fuel":18446744073709551615,"memory_bytes":9007199254740991}}',
    );
    assert.equal(claimsToJson({ name: 'x', issuedAt: new Date(1764050000999) }), '{"v":1,"name":"x","version":"0.0.0","issued_at":1764050000,"not_after":null,"capabilities":{}}');
  });

  test('modules whose structure is broken', () => {
    const bad: [string, Buffer][] = [
      ['empty', Buffer.alloc(0)],
      ['no magic', Buffer.from('0061736e01000000', 'hex')],
      ['a component (version 0d)', Buffer.from('0061736d0d000100', 'hex')],
      ['section past the end', Buffer.from('0061736d010000000105', 'hex')],
      ['truncated LEB128', Buffer.from('0061736d0100000001', 'hex')],
      ['LEB128 over 32 bits', Buffer.from('0061736d0100000001ffffffff7f', 'hex')],
      ['custom name past its section', Buffer.from('0061736d010000000002056162', 'hex')],
      ['custom name not UTF-8', Buffer.from('0061736d01000000000201ff', 'hex')],
    ];
    for (const [what, bytes] of bad) {
      assert.throws(() => sign(bytes, pem, { name: 'x' }), (e) => code(e) === 'invalid_module', what);
      assert.throws(() => codeSha256(bytes), (e) => code(e) === 'invalid_module', what);
    }
    // A non-minimal LEB128 size is accepted (the wasm spec allows it) and kept as it is.
    const padded = Buffer.concat([Buffer.from('0061736d01000000' + '00' + '8f80808000' + '0e', 'hex'), Buffer.from('this is a name')]);
    assert.equal(codeSha256(padded), fileSha256(padded));
    // A custom section whose name only starts with a BOM before bridge.signature is not a signature.
    const bom = Buffer.concat([module, Buffer.from([0, 20, 19, 0xef, 0xbb, 0xbf]), Buffer.from('bridge.signature')]);
    assert.equal(codeSha256(bom), fileSha256(bom));
  });

  test('keys that are not usable', () => {
    const der = Buffer.from(VECTOR.pem.split('\n').slice(1, 3).join(''), 'base64');
    const mismatched = Buffer.from(der);
    mismatched[mismatched.length - 1] ^= 1;
    const pemOf = (b: Buffer) => `-----BEGIN PRIVATE KEY-----\n${b.toString('base64')}\n-----END PRIVATE KEY-----\n`;
    const bad: [string, string][] = [
      ['v2 whose public key does not match', pemOf(mismatched)],
      ['encrypted', '-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n'],
      ['a public key', `-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n`],
      ['no end line', VECTOR.pem.replace('-----END PRIVATE KEY-----\n', '')],
      ['text after the end', `${VECTOR.pem}more\n`],
      ['bad base64', VECTOR.pem.replace('MFEC', 'M*EC')],
      ['truncated', pemOf(der.subarray(0, 60))],
      ['an RSA-shaped document', pemOf(Buffer.from('30820122300d06092a864886f70d01010105000382010f00', 'hex'))],
    ];
    for (const [what, text] of bad) {
      assert.throws(() => sign(module, text, { name: 'x' }), (e) => code(e) === 'invalid_key', what);
    }
    for (const text of ['ed25519:', 'ed25519:ebVWLo_mVPlAeLES6KmLp5AfhTrmlb7X4OORC60ElmR', 'ebVWLo_mVPlAeLES6KmLp5AfhTrmlb7X4OORC60ElmQ', 'ed25519:ebVWLo/mVPlAeLES6KmLp5AfhTrmlb7X4OORC60ElmQ']) {
      assert.throws(() => keyId(text), (e) => code(e) === 'invalid_key', text);
    }
  });
});

describe('against the real bridgectl and bridge-daemon', { timeout: 300_000 }, () => {
  let bridgectl: string;
  let daemon: string;
  let hello: Buffer;
  let dir: string;
  let ctlKey: string;
  let ctlPub: string;

  before(async () => {
    bridgectl = envPath('BRIDGECTL');
    daemon = envPath('BRIDGE_DAEMON');
    hello = await readFile(join(envPath('BRIDGE_WASM_DIR'), 'hello.wasm'));
    dir = await mkdtemp(join(tmpdir(), 'bridge-sign-'));
    ctlKey = join(dir, 'ctl.key');
    const out = await runJson(bridgectl, ['keygen', '--out', ctlKey]);
    ctlPub = out['public_key'] as string;
    assert.equal(publicKeyOf(await readFile(ctlKey, 'utf8')), ctlPub);
    assert.equal(keyId(ctlPub), out['key_id']);
    await writeFile(join(dir, 'hello.wasm'), hello);
  });

  after(async () => {
    if (dir !== undefined) {
      await rm(dir, { recursive: true, force: true });
    }
  });

  /** The claims, and the same as `bridgectl sign` flags. */
  const cases: [string, ClaimsInput, string[]][] = [
    ['name only', { name: 'hello', issuedAt: 1764050000 }, ['--name', 'hello', '--issued-at', '1764050000']],
    [
      'every claim',
      {
        name: 'hello.v2_x-1',
        version: 'release 1.2.3+büld "q"',
        issuedAt: new Date('2026-01-02T03:04:05Z'),
        notAfter: 1893456000,
        capabilities: {
          fuel: 1_000_000_000,
          memoryBytes: 64 * 1024 * 1024,
          timeoutMs: 10_000,
          outputBytes: 1_048_576,
          env: ['TZ', 'LANG', '_X1'],
          dirs: [{ path: '/data' }, { path: '/var/spool/ü "tab\there"', write: true }, { path: '/', write: false }],
        },
      },
      [
        '--name', 'hello.v2_x-1', '--version', 'release 1.2.3+büld "q"', '--issued-at', '2026-01-02T03:04:05Z',
        '--not-after', '1893456000', '--fuel', '1000000000', '--memory-mib', '64', '--timeout-ms', '10000',
        '--output-bytes', '1048576', '--env', 'TZ', '--env', 'LANG', '--env', '_X1',
        '--dir', '/data', '--dir', '/var/spool/ü "tab\there":rw', '--dir', '/:ro',
      ],
    ],
    ['huge fuel', { name: 'x', issuedAt: 0, capabilities: { fuel: 18446744073709551615n } }, ['--name', 'x', '--issued-at', '0', '--fuel', '18446744073709551615']],
  ];

  for (const [what, claims, flags] of cases) {
    for (const detached of [false, true]) {
      test(`${what}, ${detached ? 'detached' : 'embedded'}: the same bytes as bridgectl sign`, async () => {
        const out = join(dir, `ctl-${detached}.out`);
        const printed = await runJson(bridgectl, ['sign', join(dir, 'hello.wasm'), '--key', ctlKey, ...flags, ...(detached ? ['--detached'] : []), '-o', out]);
        const expected = await readFile(out);
        const mine = signWithDetails(hello, await readFile(ctlKey, 'utf8'), claims, { detached });
        assert.equal(mine.bytes.length, expected.length);
        assert.ok(mine.bytes.equals(expected), 'the bytes differ from bridgectl sign');
        assert.equal(mine.keyId, printed['key_id']);
        assert.equal(mine.codeSha256, printedCodeSha(printed));
        assert.equal(mine.codeSha256, fileSha256(hello));
        if (printed['file_sha256'] !== undefined) {
          assert.equal(mine.fileSha256, printed['file_sha256']);
        }
        assert.equal(mine.fileSha256, fileSha256(detached ? hello : expected));
        assert.deepEqual(JSON.parse(mine.claimsJson), printed['claims']);
      });
    }
  }

  test('re-signing a bridgectl-signed module: the same bytes as bridgectl, the old key id reported', async () => {
    const first = join(dir, 'first.wasm');
    await runJson(bridgectl, ['sign', join(dir, 'hello.wasm'), '--key', ctlKey, '--name', 'hello', '--issued-at', '1', '-o', first]);
    const other = keygen();
    const otherKey = join(dir, 'other.key');
    await writeFile(otherKey, other.privateKey, { mode: 0o600 });
    const second = join(dir, 'second.wasm');
    const printed = await runJson(bridgectl, ['sign', first, '--key', otherKey, '--name', 'hello', '--issued-at', '2', '-o', second]);
    const mine = signWithDetails(await readFile(first), other.privateKey, { name: 'hello', issuedAt: 2 });
    assert.ok(mine.bytes.equals(await readFile(second)));
    assert.deepEqual(mine.replacedKeyIds, printed['replaced_key_ids']);
    assert.deepEqual(mine.replacedKeyIds, [keyId(ctlPub)]);
  });

  test('bridgectl sign takes a key from keygen(), and bridgectl verify names it', async () => {
    const key = keygen();
    assert.match(key.privateKey, /^-----BEGIN PRIVATE KEY-----\n[A-Za-z0-9+/]{64}\n[A-Za-z0-9+/=]{48}\n-----END PRIVATE KEY-----\n$/);
    assert.equal(Buffer.from(key.privateKey.split('\n').slice(1, 3).join(''), 'base64').length, 83);
    const file = join(dir, 'js.key');
    await writeFile(file, key.privateKey, { mode: 0o600 });
    await chmod(file, 0o600);
    const out = join(dir, 'by-ctl.wasm');
    const printed = await runJson(bridgectl, ['sign', join(dir, 'hello.wasm'), '--key', file, '--name', 'hello', '--issued-at', '1764050000', '-o', out]);
    assert.equal(printed['key_id'], key.keyId);
    const mine = signWithDetails(hello, key.privateKey, { name: 'hello', issuedAt: 1764050000 });
    assert.ok(mine.bytes.equals(await readFile(out)));
    const verified = await runJson(bridgectl, ['verify', out, '--trusted-key', key.publicKey]);
    assert.equal(verified['valid'], true);
    assert.equal(verified['key_id'], key.keyId);
  });

  test('bridgectl verify accepts a JS-signed module and refuses it with one code byte flipped', async () => {
    const key = keygen();
    const signed = signWithDetails(hello, key.privateKey, { name: 'hello', version: '1.0.0', capabilities: { fuel: 500_000_000 } });
    const path = join(dir, 'js-signed.wasm');
    await writeFile(path, signed.bytes);
    const ok = await runJson(bridgectl, ['verify', path, '--trusted-key', key.publicKey]);
    assert.equal(ok['valid'], true);
    assert.equal(ok['key_id'], key.keyId);
    assert.equal(printedCodeSha(ok), signed.codeSha256);

    const detached = sign(hello, key.privateKey, { name: 'hello' }, { detached: true });
    await writeFile(join(dir, 'hello.wasm.sig'), detached);
    const okDetached = await runJson(bridgectl, ['verify', join(dir, 'hello.wasm'), '--trusted-key', key.publicKey, '--signature', join(dir, 'hello.wasm.sig')]);
    assert.equal(okDetached['valid'], true);

    const tampered = Buffer.from(signed.bytes);
    const [start, end] = sectionContents(tampered, 10);
    const at = Math.floor((start + end) / 2);
    tampered[at] = (tampered[at] as number) ^ 0x01;
    await writeFile(path, tampered);
    const bad = await run(bridgectl, ['verify', path, '--trusted-key', key.publicKey]);
    assert.equal(bad.code, 1, bad.stderr);
    const verdict = JSON.parse(bad.stdout) as Record<string, unknown>;
    assert.equal(verdict['valid'], false);
    assert.equal(verdict['reason'], 'bad_signature');
    assert.equal(verdict['key_id'], key.keyId);

    const stranger = await run(bridgectl, ['verify', join(dir, 'hello.wasm'), '--trusted-key', keygen().publicKey, '--signature', join(dir, 'hello.wasm.sig')]);
    assert.equal((JSON.parse(stranger.stdout) as Record<string, unknown>)['reason'], 'unknown_key');
  });

  test('the real agent (bridge-daemon call) runs a JS-signed module and refuses a tampered one', async () => {
    const key = keygen();
    const signed = sign(hello, key.privateKey, { name: 'hello', version: '1.0.0' });
    const path = join(dir, 'call.wasm');
    await writeFile(path, signed);
    const ok = await run(daemon, ['call', path, '--trusted-key', key.publicKey, '--no-cache']);
    assert.equal(ok.code, 0, ok.stdout + ok.stderr);
    const result = JSON.parse(ok.stdout) as Record<string, unknown>;
    assert.equal(result['status'], 'ok');
    assert.deepEqual(result['output'], { greeting: 'Hello, world!' });

    const tampered = Buffer.from(signed);
    const [start, end] = sectionContents(tampered, 10);
    const at = Math.floor((start + end) / 2);
    tampered[at] = (tampered[at] as number) ^ 0x01;
    await writeFile(path, tampered);
    const bad = await run(daemon, ['call', path, '--trusted-key', key.publicKey, '--no-cache']);
    assert.equal(bad.code, 1, bad.stdout + bad.stderr);
    const refused = JSON.parse(bad.stdout) as Record<string, unknown>;
    assert.equal(refused['status'], 'rejected');
    assert.equal(refused['reason'], 'bad_signature');
  });
});
