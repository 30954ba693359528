// The web side of a platform: HTTP routes that drive agents through @bridge/platform.
// A real product puts its own users, auth and database in front of these.

import express from 'express';

/** The Express app for `platform` (a started `Platform`). */
export function createApp(platform) {
  const app = express();
  app.use(express.json({ limit: '1mb' }));

  // The agents, connected or not, with their latest status.
  app.get('/agents', (_req, res) => res.json(platform.agents()));

  // Run a command on an agent and answer with its result (202 if it is still running).
  app.post('/agents/:id/run', async (req, res) => {
    const { command, input = null, args = [], taskId } = req.body ?? {};
    if (typeof command !== 'string') return res.status(400).json({ error: 'command is required' });
    try {
      const result = await platform.run(req.params.id, { command, input, args, taskId, waitMs: 30_000 });
      res.json(result);
    } catch (e) {
      res.status(502).json({ error: String(e.message ?? e) });
    }
  });

  // A result, as the platform stored it (exactly one per task id).
  app.get('/results/:taskId', async (req, res) => {
    const stored = await platform.result(req.params.taskId);
    stored ? res.json(stored) : res.status(404).json({ error: 'no result yet' });
  });
  return app;
}
