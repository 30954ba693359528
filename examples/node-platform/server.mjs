// Runs the example platform: agents connect to wss://BRIDGE_LISTEN/agent, people to
// http://HTTP_LISTEN. State (server key, agents, tokens, results) goes to ./state.

import { Platform } from '@bridge/platform';
import { createApp } from './app.mjs';

const platform = await Platform.start({
  listen: process.env.BRIDGE_LISTEN ?? '127.0.0.1:8443',
  stateDir: process.env.BRIDGE_STATE ?? new URL('./state', import.meta.url).pathname,
});
const token = await platform.issueToken({ ttlMs: 24 * 3600 * 1000 });
const [host, port] = (process.env.HTTP_LISTEN ?? '127.0.0.1:3000').split(/:(?=\d+$)/);
const http = createApp(platform).listen(Number(port), host, () => {
  console.log(`platform for agents: ${platform.url} (pin ${platform.pin})`);
  console.log(`web API: http://${host}:${http.address().port}`);
  console.log('start an agent with:');
  console.log(`  bridge-daemon run --server ${platform.url} --server-pin ${platform.pin} --token ${token} --state agent/`);
});
for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, async () => {
    http.close();
    await platform.close();
    process.exit(0);
  });
}
