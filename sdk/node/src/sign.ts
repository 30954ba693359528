// Handler signing (docs/signing.md, format version 1) in JavaScript: keys, claims, the envelope
// and the `bridge.signature` section, byte for byte as `bridgectl keygen` and `bridgectl sign`.

import { createHash, createPrivateKey, createPublicKey, generateKeyPairSync, sign as edSign } from 'node:crypto';
import type { KeyObject } from 'node:crypto';

/** Why signing (or reading a key or a module) failed. */
export type SignErrorCode =
  /** The module's section structure is broken, or it is not a core wasm module. */
  | 'invalid_module'
  /** The claims break a rule a verifier applies (or have an unknown field). */
  | 'invalid_claims'
  /** The private or public key is not in a form this module reads. */
  | 'invalid_key';

/** An error from this module, with a machine-readable `code`. */
export class SignError extends Error {
  /** What kind of input was refused. */
  readonly code: SignErrorCode;

  /** An error of kind `code`; `message` says what was refused and why. */
  constructor(code: SignErrorCode, message: string) {
    super(message);
    this.name = 'SignError';
    this.code = code;
  }
}

/** A publisher key pair, in the forms `bridgectl keygen` writes and prints. */
export interface KeyPair {
  /**
   * The private key file text: a `PRIVATE KEY` PEM of the 83-byte PKCS#8 v2 document, in lines
   * of 64 characters, every line ending in `\n` (what `bridgectl keygen` writes to `KEY`).
   */
  privateKey: string;
  /** The public key text form, `ed25519:` and the base64url (no padding) of its 32 bytes. */
  publicKey: string;
  /** The key id: the first 16 bytes of SHA-256 of the public key, as 32 lowercase hex. */
  keyId: string;
}

/** One directory a handler may open. */
export interface DirGrant {
  /** A clean absolute path: `/`-separated, no empty, `.` or `..` components, no trailing `/`. */
  path: string;
  /** Whether writes are allowed. Default `false`. */
  write?: boolean;
}

/** An unsigned integer claim: a safe non-negative integer, or a bigint below 2^64. */
export type U64 = number | bigint;

/**
 * What a handler may be granted. A field left out is not granted beyond the agent's default
 * (numbers) or at all (`env`, `dirs`). Unknown fields are refused.
 */
export interface Capabilities {
  /** Fuel units for one run (claim `fuel`). */
  fuel?: U64;
  /** Linear memory in bytes (claim `memory_bytes`). */
  memoryBytes?: U64;
  /** Wall-clock time for one run, in milliseconds (claim `timeout_ms`). */
  timeoutMs?: U64;
  /** Bytes kept of each of stdout and stderr (claim `output_bytes`). */
  outputBytes?: U64;
  /** Environment variables the handler may read, names `[A-Za-z_][A-Za-z0-9_]*`. An empty list is left out, as `bridgectl` does. */
  env?: string[];
  /** Host directories the handler may open. An empty list is left out, as `bridgectl` does. */
  dirs?: DirGrant[];
}

/** The claims to sign, as `bridgectl sign`'s flags give them. Unknown fields are refused. */
export interface ClaimsInput {
  /** The handler's name, `[a-z0-9][a-z0-9._-]{0,63}`. */
  name: string;
  /** The handler's version, 1 to 64 bytes of UTF-8 without control characters. Default `0.0.0`. */
  version?: string;
  /** The signing time: a `Date` (whole seconds are kept) or unix seconds. Default: now. */
  issuedAt?: Date | U64;
  /** The last second the signature is valid (inclusive); `null` or left out: no expiry. */
  notAfter?: Date | U64 | null;
  /** What the handler may be granted. */
  capabilities?: Capabilities;
}

/** Options of {@link sign} and {@link signWithDetails}. */
export interface SignOptions {
  /** Return the envelope alone (the content of a detached `MODULE.wasm.sig`) and leave the module unchanged. */
  detached?: boolean;
}

/** A signature made by {@link signWithDetails}. */
export interface SignResult {
  /**
   * What `bridgectl sign` writes: the signed module (the input without its old
   * `bridge.signature` sections, the new one appended), or, with `detached`, the envelope.
   */
  bytes: Buffer;
  /** Whether `bytes` is a detached envelope. */
  detached: boolean;
  /** The envelope (equal to `bytes` when detached). */
  envelope: Buffer;
  /** The signing key's id (32 lowercase hex). */
  keyId: string;
  /** SHA-256 (hex) of the module without signature sections: what the signature covers. */
  codeSha256: string;
  /**
   * SHA-256 (hex) of the file to upload: of the signed module, or with `detached` of the
   * module as given. This is the `file_sha256` the protocol's `run` names.
   */
  fileSha256: string;
  /** The claims exactly as signed (compact JSON, `bridgectl`'s field order). */
  claimsJson: string;
  /** The signature sections removed (embedded only): the key id each named, `null` for an undecodable one. */
  replacedKeyIds: (string | null)[];
}

const PKCS8_V2_PREFIX = Buffer.from('3051020101300506032b657004220420', 'hex');
const PKCS8_V2_MIDDLE = Buffer.from('812100', 'hex');
const PKCS8_V1_PREFIX = Buffer.from('302e020100300506032b657004220420', 'hex');
const SPKI_PREFIX = Buffer.from('302a300506032b6570032100', 'hex');
const PEM_BEGIN = '-----BEGIN PRIVATE KEY-----';
const PEM_END = '-----END PRIVATE KEY-----';
const WASM_HEADER = Buffer.from('0061736d01000000', 'hex');
const SECTION_NAME = 'bridge.signature';
const SIGNED_MESSAGE_PREFIX = Buffer.from('bridge.signature.v1\0', 'latin1');
const MAX_CLAIMS_LEN = 64 * 1024;
const U64_MAX = (1n << 64n) - 1n;

/** Generates a new publisher key pair (Ed25519), in the forms `bridgectl keygen` writes. */
export function keygen(): KeyPair {
  const { privateKey } = generateKeyPairSync('ed25519');
  const jwk = privateKey.export({ format: 'jwk' });
  if (jwk.d === undefined) {
    throw new Error('node:crypto exported an Ed25519 key without its private part');
  }
  return keyPairFromSeed(Buffer.from(jwk.d, 'base64url'));
}

/**
 * The key pair whose 32-byte private seed is `seed` (test vectors, importing keys from other
 * tools). The PEM is the PKCS#8 v2 document `bridgectl keygen` would write for it.
 */
export function keyPairFromSeed(seed: Uint8Array): KeyPair {
  if (seed.length !== 32) {
    throw new SignError('invalid_key', `an Ed25519 seed is 32 bytes, not ${seed.length}`);
  }
  const key = privateKeyFromSeed(seed);
  const pub = rawPublicKey(key);
  const der = Buffer.concat([PKCS8_V2_PREFIX, seed, PKCS8_V2_MIDDLE, pub]);
  return { privateKey: toPem(der), publicKey: publicKeyText(pub), keyId: keyIdOfRaw(pub) };
}

/**
 * The key id of a public key given in its text form (`ed25519:...`) or as its 32 raw bytes:
 * the first 16 bytes of its SHA-256, as 32 lowercase hex.
 */
export function keyId(publicKey: string | Uint8Array): string {
  return keyIdOfRaw(typeof publicKey === 'string' ? parsePublicKey(publicKey) : checkRawPublicKey(publicKey));
}

/**
 * The public key text form (`ed25519:...`) of a private key file's text, as `bridgectl keygen`
 * prints it.
 */
export function publicKeyOf(privateKeyPem: string): string {
  return publicKeyText(rawPublicKey(loadPrivateKey(privateKeyPem)));
}

/** SHA-256 (hex) of the exact bytes: a file's `file_sha256`. */
export function fileSha256(bytes: Uint8Array): string {
  return createHash('sha256').update(bytes).digest('hex');
}

/**
 * SHA-256 (hex) of the module with every `bridge.signature` section removed: its
 * `code_sha256`, what a signature covers (re-signing does not change it). Throws a
 * {@link SignError} `invalid_module` when the module's section structure is broken.
 */
export function codeSha256(module: Uint8Array): string {
  return fileSha256(stripSignatures(module));
}

/**
 * The module without its `bridge.signature` sections (the "stripped module" of
 * docs/signing.md); every other byte is kept, in order.
 */
export function stripSignatures(module: Uint8Array): Buffer {
  const layout = parseModule(module);
  return layout.stripped;
}

/**
 * Signs a wasm module with a private key file's text (PKCS#8 v2 as `bridgectl keygen` writes,
 * or v1 as `openssl genpkey -algorithm ed25519` writes), exactly as `bridgectl sign` does for
 * the same claims and issue time: the claims are validated (as a verifier would) and
 * serialized as compact JSON in `bridgectl`'s field order; an existing signature is replaced.
 *
 * Returns what `bridgectl sign` writes: the signed module (the file to upload: `run`'s
 * `module`, `installHandler`'s bytes), or with `detached` the envelope (a `MODULE.wasm.sig`).
 * Throws a {@link SignError} for a broken module, bad claims or an unusable key.
 */
export function sign(module: Uint8Array, privateKeyPem: string, claims: ClaimsInput, options: SignOptions = {}): Buffer {
  return signWithDetails(module, privateKeyPem, claims, options).bytes;
}

/**
 * {@link sign}, returning with the bytes what `bridgectl sign` prints: the key id, the
 * `code_sha256` and `file_sha256`, the claims as signed and the key ids of replaced signatures.
 */
export function signWithDetails(
  module: Uint8Array,
  privateKeyPem: string,
  claims: ClaimsInput,
  options: SignOptions = {},
): SignResult {
  checkKeys(options, ['detached'], 'sign options');
  const detached = options.detached ?? false;
  if (typeof detached !== 'boolean') {
    throw new TypeError('sign options: detached must be a boolean');
  }
  const claimsJson = claimsToJson(claims);
  const claimsBytes = Buffer.from(claimsJson, 'utf8');
  if (claimsBytes.length > MAX_CLAIMS_LEN) {
    throw new SignError('invalid_claims', `invalid claims: claims are ${claimsBytes.length} bytes, more than the ${MAX_CLAIMS_LEN} allowed`);
  }
  const key = loadPrivateKey(privateKeyPem);
  const layout = parseModule(module);
  const code = createHash('sha256').update(layout.stripped).digest();
  const message = Buffer.concat([SIGNED_MESSAGE_PREFIX, code, claimsBytes]);
  const signature = edSign(null, message, key);
  const kid = Buffer.from(keyIdOfRaw(rawPublicKey(key)), 'hex');
  const len = Buffer.alloc(4);
  len.writeUInt32LE(claimsBytes.length);
  const envelope = Buffer.concat([Buffer.from('BRSG', 'latin1'), Buffer.from([1, 1]), kid, len, claimsBytes, signature]);
  const common = { envelope, keyId: kid.toString('hex'), codeSha256: code.toString('hex'), claimsJson };
  if (detached) {
    return { ...common, bytes: envelope, detached, fileSha256: fileSha256(module), replacedKeyIds: [] };
  }
  const name = Buffer.concat([leb128(SECTION_NAME.length), Buffer.from(SECTION_NAME, 'latin1')]);
  const section = Buffer.concat([Buffer.from([0]), leb128(name.length + envelope.length), name, envelope]);
  const bytes = Buffer.concat([layout.stripped, section]);
  const replacedKeyIds = layout.payloads.map(envelopeKeyId);
  return { ...common, bytes, detached, fileSha256: fileSha256(bytes), replacedKeyIds };
}

/**
 * The claims JSON `sign` signs for these claims: compact, fields in the order `v`, `name`,
 * `version`, `issued_at`, `not_after` (`null` when none), `capabilities` (`{}` when none; inside,
 * `fuel`, `memory_bytes`, `timeout_ms`, `output_bytes`, `env`, `dirs`, each left out when not
 * given). Throws a {@link SignError} `invalid_claims` for claims a verifier would refuse.
 */
export function claimsToJson(claims: ClaimsInput): string {
  if (typeof claims !== 'object' || claims === null || Array.isArray(claims)) {
    throw invalid('the claims must be an object');
  }
  checkKeys(claims, ['name', 'version', 'issuedAt', 'notAfter', 'capabilities'], 'claims', 'invalid_claims');
  const { name } = claims;
  if (typeof name !== 'string' || !/^[a-z0-9][a-z0-9._-]{0,63}$/.test(name)) {
    throw invalid(`name ${JSON.stringify(name)} is not [a-z0-9][a-z0-9._-]{0,63}`);
  }
  const version = claims.version ?? '0.0.0';
  if (typeof version !== 'string') {
    throw invalid('version must be a string');
  }
  checkText(version, 'version');
  const versionBytes = Buffer.byteLength(version, 'utf8');
  if (versionBytes === 0 || versionBytes > 64 || /[\u0000-\u001f\u007f-\u009f]/.test(version)) {
    throw invalid(`version ${JSON.stringify(version)} must be 1 to 64 bytes without control characters`);
  }
  const issuedAt = claims.issuedAt === undefined ? BigInt(Math.floor(Date.now() / 1000)) : time(claims.issuedAt, 'issuedAt');
  const notAfter = claims.notAfter === undefined || claims.notAfter === null ? null : time(claims.notAfter, 'notAfter');
  const parts = [
    `"v":1`,
    `"name":${JSON.stringify(name)}`,
    `"version":${JSON.stringify(version)}`,
    `"issued_at":${issuedAt}`,
    `"not_after":${notAfter === null ? 'null' : notAfter}`,
    `"capabilities":${capabilitiesToJson(claims.capabilities ?? {})}`,
  ];
  return `{${parts.join(',')}}`;
}

function capabilitiesToJson(caps: Capabilities): string {
  if (typeof caps !== 'object' || caps === null || Array.isArray(caps)) {
    throw invalid('capabilities must be an object');
  }
  checkKeys(caps, ['fuel', 'memoryBytes', 'timeoutMs', 'outputBytes', 'env', 'dirs'], 'capabilities', 'invalid_claims');
  const parts: string[] = [];
  const numbers: [keyof Capabilities, string][] = [
    ['fuel', 'fuel'],
    ['memoryBytes', 'memory_bytes'],
    ['timeoutMs', 'timeout_ms'],
    ['outputBytes', 'output_bytes'],
  ];
  for (const [field, json] of numbers) {
    const value = caps[field];
    if (value !== undefined) {
      parts.push(`"${json}":${u64(value as U64, `capabilities.${field}`)}`);
    }
  }
  if (caps.env !== undefined) {
    if (!Array.isArray(caps.env)) {
      throw invalid('capabilities.env must be an array of names');
    }
    for (const name of caps.env) {
      if (typeof name !== 'string' || !/^[A-Za-z_][A-Za-z0-9_]*$/.test(name)) {
        throw invalid(`env name ${JSON.stringify(name)} is not [A-Za-z_][A-Za-z0-9_]*`);
      }
    }
    if (caps.env.length > 0) {
      parts.push(`"env":[${caps.env.map((n) => JSON.stringify(n)).join(',')}]`);
    }
  }
  if (caps.dirs !== undefined) {
    if (!Array.isArray(caps.dirs)) {
      throw invalid('capabilities.dirs must be an array of { path, write? }');
    }
    const dirs = caps.dirs.map((dir) => {
      if (typeof dir !== 'object' || dir === null || Array.isArray(dir)) {
        throw invalid('each of capabilities.dirs must be an object { path, write? }');
      }
      checkKeys(dir, ['path', 'write'], 'a dir', 'invalid_claims');
      const write = dir.write ?? false;
      if (typeof dir.path !== 'string' || typeof write !== 'boolean') {
        throw invalid('a dir is { path: string, write?: boolean }');
      }
      checkText(dir.path, 'dir path');
      if (!isCleanAbsPath(dir.path)) {
        throw invalid(`dir path ${JSON.stringify(dir.path)} is not a clean absolute path (no '.', '..', empty components or trailing '/')`);
      }
      return `{"path":${JSON.stringify(dir.path)},"write":${write}}`;
    });
    if (dirs.length > 0) {
      parts.push(`"dirs":[${dirs.join(',')}]`);
    }
  }
  return `{${parts.join(',')}}`;
}

function isCleanAbsPath(path: string): boolean {
  if (path === '/') {
    return true;
  }
  if (!path.startsWith('/') || path.includes('\0')) {
    return false;
  }
  return path
    .slice(1)
    .split('/')
    .every((c) => c !== '' && c !== '.' && c !== '..');
}

/** Refuses strings with lone UTF-16 surrogates: they have no UTF-8 form, so Rust cannot hold them. */
function checkText(text: string, what: string): void {
  if (/[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/.test(text)) {
    throw invalid(`${what} is not valid Unicode (a lone surrogate)`);
  }
}

function time(value: Date | U64, what: string): bigint {
  if (value instanceof Date) {
    const ms = value.getTime();
    if (!Number.isFinite(ms) || ms < 0) {
      throw invalid(`${what} must be a valid date not before 1970`);
    }
    return BigInt(Math.floor(ms / 1000));
  }
  return u64(value, what);
}

function u64(value: U64, what: string): bigint {
  if (typeof value === 'bigint') {
    if (value < 0n || value > U64_MAX) {
      throw invalid(`${what} ${value} is not an unsigned 64-bit integer`);
    }
    return value;
  }
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0) {
    throw invalid(`${what} must be a non-negative safe integer or a bigint, not ${String(value)}`);
  }
  return BigInt(value);
}

function checkKeys(object: object, allowed: string[], what: string, code?: SignErrorCode): void {
  for (const key of Object.keys(object)) {
    if (!allowed.includes(key)) {
      const message = `${what}: unknown field ${JSON.stringify(key)} (known: ${allowed.join(', ')})`;
      throw code === undefined ? new TypeError(message) : new SignError(code, message);
    }
  }
}

function invalid(message: string): SignError {
  return new SignError('invalid_claims', `invalid claims: ${message}`);
}

function privateKeyFromSeed(seed: Uint8Array): KeyObject {
  return createPrivateKey({ key: Buffer.concat([PKCS8_V1_PREFIX, seed]), format: 'der', type: 'pkcs8' });
}

function rawPublicKey(key: KeyObject): Buffer {
  const spki = createPublicKey(key).export({ format: 'der', type: 'spki' });
  return spki.subarray(SPKI_PREFIX.length);
}

function publicKeyText(raw: Uint8Array): string {
  return `ed25519:${Buffer.from(raw).toString('base64url')}`;
}

function keyIdOfRaw(raw: Uint8Array): string {
  return createHash('sha256').update(raw).digest().subarray(0, 16).toString('hex');
}

function checkRawPublicKey(raw: Uint8Array): Uint8Array {
  if (raw.length !== 32) {
    throw new SignError('invalid_key', `an Ed25519 public key is 32 bytes, not ${raw.length}`);
  }
  return raw;
}

function parsePublicKey(text: string): Buffer {
  const b64 = text.trim().startsWith('ed25519:') ? text.trim().slice(8) : undefined;
  if (b64 === undefined || b64.length !== 43 || !/^[A-Za-z0-9_-]+$/.test(b64)) {
    throw new SignError('invalid_key', `malformed public key ${JSON.stringify(text)}: expected "ed25519:" followed by the base64url (no padding) encoding of 32 bytes`);
  }
  const raw = Buffer.from(b64, 'base64url');
  // 43 characters carry 258 bits: the last 2 must be zero for the encoding to be canonical.
  if (raw.length !== 32 || raw.toString('base64url') !== b64) {
    throw new SignError('invalid_key', `malformed public key ${JSON.stringify(text)}: not the canonical base64url of 32 bytes`);
  }
  return raw;
}

function toPem(der: Buffer): string {
  const b64 = der.toString('base64');
  const lines = [PEM_BEGIN];
  for (let i = 0; i < b64.length; i += 64) {
    lines.push(b64.slice(i, i + 64));
  }
  lines.push(PEM_END);
  return `${lines.join('\n')}\n`;
}

/** Reads a private key file's text the way `bridgectl` does: PKCS#8 v2 (checked) or v1. */
function loadPrivateKey(pem: string): KeyObject {
  if (typeof pem !== 'string') {
    throw new SignError('invalid_key', 'the private key must be the text of a PEM file');
  }
  const lines = pem.split(/\r?\n/).map((l) => l.trim());
  let i = 0;
  while (i < lines.length && lines[i] === '') {
    i++;
  }
  if (lines[i]?.startsWith('-----BEGIN ENCRYPTED')) {
    throw new SignError('invalid_key', 'malformed private key file: encrypted private keys are not supported');
  }
  if (lines[i] !== PEM_BEGIN) {
    throw new SignError('invalid_key', `malformed private key file: expected the first line to be ${PEM_BEGIN}`);
  }
  const end = lines.indexOf(PEM_END, i + 1);
  if (end < 0) {
    throw new SignError('invalid_key', `malformed private key file: missing ${PEM_END}`);
  }
  if (lines.slice(end + 1).some((l) => l !== '')) {
    throw new SignError('invalid_key', `malformed private key file: text after ${PEM_END}`);
  }
  const b64 = lines.slice(i + 1, end).join('');
  if (!/^[A-Za-z0-9+/]*={0,2}$/.test(b64) || b64.length % 4 !== 0) {
    throw new SignError('invalid_key', 'malformed private key file: bad base64');
  }
  const der = Buffer.from(b64, 'base64');
  let seed: Buffer;
  if (der.length === 83 && der.subarray(0, 16).equals(PKCS8_V2_PREFIX) && der.subarray(48, 51).equals(PKCS8_V2_MIDDLE)) {
    seed = der.subarray(16, 48);
    const key = privateKeyFromSeed(seed);
    if (!rawPublicKey(key).equals(der.subarray(51))) {
      throw new SignError('invalid_key', 'the private key is not a usable Ed25519 PKCS#8 key: its public key does not match its private key');
    }
    return key;
  }
  if (der.length === 48 && der.subarray(0, 16).equals(PKCS8_V1_PREFIX)) {
    seed = der.subarray(16);
    return privateKeyFromSeed(seed);
  }
  throw new SignError('invalid_key', 'the private key is not a usable Ed25519 PKCS#8 key (expected the v2 form bridgectl keygen writes, or v1)');
}

function leb128(value: number): Buffer {
  const out: number[] = [];
  let n = value;
  for (;;) {
    const byte = n & 0x7f;
    n = Math.floor(n / 128);
    if (n === 0) {
      out.push(byte);
      return Buffer.from(out);
    }
    out.push(byte | 0x80);
  }
}

interface ModuleLayout {
  /** The module without its signature sections. */
  stripped: Buffer;
  /** The payloads (envelopes) of the signature sections, in module order. */
  payloads: Buffer[];
}

function badModule(offset: number, reason: string): SignError {
  return new SignError('invalid_module', `invalid wasm module: ${reason} (at byte ${offset})`);
}

/** Reads an unsigned LEB128 of at most 32 bits (at most 5 bytes); returns [value, next position]. */
function readLeb(bytes: Buffer, start: number, what: string): [number, number] {
  let result = 0;
  let pos = start;
  for (let i = 0; i < 5; i++) {
    const b = bytes[pos];
    if (b === undefined) {
      throw badModule(pos, `${what}: truncated LEB128 integer`);
    }
    pos++;
    if (i === 4 && (b & 0xf0) !== 0) {
      throw badModule(pos, `${what}: LEB128 integer too large for u32`);
    }
    result += (b & 0x7f) * 2 ** (7 * i);
    if ((b & 0x80) === 0) {
      return [result, pos];
    }
  }
  throw new Error('unreachable: the fifth LEB128 byte ends the integer or is refused');
}

/** Walks the module's top-level sections exactly as the `bridge-signing` crate does. */
function parseModule(module: Uint8Array): ModuleLayout {
  if (!(module instanceof Uint8Array)) {
    throw new TypeError('the module must be a Uint8Array');
  }
  const bytes = Buffer.from(module.buffer, module.byteOffset, module.byteLength);
  if (bytes.length < 8 || !bytes.subarray(0, 4).equals(WASM_HEADER.subarray(0, 4))) {
    throw badModule(0, 'missing the \\0asm magic number');
  }
  if (!bytes.subarray(4, 8).equals(WASM_HEADER.subarray(4, 8))) {
    throw badModule(4, 'unsupported wasm version (only core modules, version 1, are accepted)');
  }
  const kept: Buffer[] = [];
  const payloads: Buffer[] = [];
  let from = 0;
  let pos = 8;
  const utf8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });
  while (pos < bytes.length) {
    const start = pos;
    const id = bytes[pos] as number;
    const [size, contentsStart] = readLeb(bytes, pos + 1, 'section size');
    const end = contentsStart + size;
    if (end > bytes.length) {
      throw badModule(start, `section (id ${id}) of ${size} bytes runs past the end of the module (${bytes.length} bytes)`);
    }
    if (id === 0) {
      const contents = bytes.subarray(contentsStart, end);
      const [nameLen, p] = readLeb(contents, 0, 'custom section name');
      if (p + nameLen > contents.length) {
        throw badModule(contentsStart, 'custom section name runs past the end of its section');
      }
      let name: string;
      try {
        name = utf8.decode(contents.subarray(p, p + nameLen));
      } catch {
        throw badModule(contentsStart + p, 'custom section name is not UTF-8');
      }
      if (name === SECTION_NAME) {
        kept.push(bytes.subarray(from, start));
        from = end;
        payloads.push(contents.subarray(p + nameLen));
      }
    }
    pos = end;
  }
  kept.push(bytes.subarray(from));
  return { stripped: payloads.length === 0 ? Buffer.from(bytes) : Buffer.concat(kept), payloads };
}

/** The key id an envelope names, or `null` when its framing is broken (as `bridgectl` reports replaced signatures). */
function envelopeKeyId(envelope: Buffer): string | null {
  if (envelope.length < 90 || envelope.toString('latin1', 0, 4) !== 'BRSG' || envelope[4] !== 1 || envelope[5] !== 1) {
    return null;
  }
  const n = envelope.readUInt32LE(22);
  if (n > MAX_CLAIMS_LEN || envelope.length !== 90 + n) {
    return null;
  }
  return envelope.subarray(6, 22).toString('hex');
}
