export { SignError, claimsToJson, codeSha256, fileSha256, keyId, keyPairFromSeed, keygen, publicKeyOf, sign, stripSignatures } from './sign.js';
export type { Capabilities, ClaimsInput, DirGrant, KeyPair, SignErrorCode, SignOptions, SignResult, U64 } from './sign.js';
export { PgStore } from './pg-store.js';
export type { PgStoreOptions } from './pg-store.js';
