// Generates src/protocol.ts, the TypeScript types of every protocol message, from the JSON
// Schema that `cargo xtask schema` writes from the Rust wire types (protocol/schema/).
// `npm run gen-types` writes the file; `--check` only compares and fails when it differs
// (the tests run that, so the types cannot drift from the schema).

import { readFileSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { compile } from 'json-schema-to-typescript';

const here = (p) => fileURLToPath(new URL(p, import.meta.url));
const SCHEMAS = ['agent-message', 'platform-message'];
const OUT = here('../src/protocol.ts');

export async function generate() {
  const parts = [
    '// The protocol\'s messages (version 2), generated from protocol/schema/*.schema.json by\n' +
      '// `npm run gen-types`. Do not edit: change the Rust wire types, run `cargo xtask schema`,\n' +
      '// then `npm run gen-types`.\n',
  ];
  const seen = new Set();
  for (const name of SCHEMAS) {
    const schema = JSON.parse(readFileSync(here(`../../../protocol/schema/${name}.schema.json`), 'utf8'));
    let ts = await compile(schema, schema.title, {
      bannerComment: '',
      additionalProperties: false,
      unreachableDefinitions: true,
      style: { singleQuote: true, printWidth: 100 },
    });
    // Both schemas define the shared types (ErrorBody, ErrorCode…): keep the first of each.
    const blocks = ts.split(/\n(?=(?:\/\*\*[\s\S]*?\*\/\n)?export )/);
    ts = blocks
      .filter((block) => {
        const m = block.match(/export (?:interface|type) (\w+)/);
        if (!m) return true;
        if (seen.has(m[1])) return false;
        seen.add(m[1]);
        return true;
      })
      .join('\n');
    parts.push(ts.trim() + '\n');
  }
  return parts.join('\n');
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const text = await generate();
  if (process.argv.includes('--check')) {
    const current = readFileSync(OUT, 'utf8');
    if (current !== text) {
      console.error('src/protocol.ts differs from the schema: run `npm run gen-types`');
      process.exit(1);
    }
  } else {
    writeFileSync(OUT, text);
  }
}
