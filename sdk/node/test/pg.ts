// A private PostgreSQL server for the tests: its own data directory in a temporary directory,
// listening only on a Unix socket in that directory, trust authentication, stopped and deleted
// at the end. A machine without PostgreSQL's server binaries fails the run; it never skips.

import { execFile, spawnSync } from 'node:child_process';
import { existsSync, readdirSync, realpathSync } from 'node:fs';
import { chmod, chown, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { delimiter, dirname, join } from 'node:path';

/** A running private PostgreSQL server. */
export interface PgServer {
  /** The directory of its Unix socket: the `host` a `pg` client connects to. */
  socketDir: string;
  /** The port (names the socket file; nothing listens on TCP). */
  port: number;
  /** The superuser to connect as (trust authentication: no password). */
  user: string;
  /** The database to connect to. */
  database: string;
  /** A `pg` connection config for this server. */
  config(): { host: string; port: number; user: string; database: string };
  /** A `postgres://` connection string for this server. */
  connectionString(): string;
  /** Stops the server (fast shutdown) and deletes its directory. */
  stop(): Promise<void>;
}

const MISSING =
  "PostgreSQL's server binaries (initdb, pg_ctl, postgres) were found neither on PATH nor in " +
  '/usr/lib/postgresql/*/bin: install them (Debian: `apt-get install -y postgresql`; `.ci/run` does) — ' +
  'the PostgreSQL store is tested against a real server';

/** Finds the directory holding initdb, pg_ctl and postgres, or throws what to install. */
export function findPgBin(): string {
  const candidates: string[] = [];
  for (const dir of (process.env['PATH'] ?? '').split(delimiter)) {
    if (dir !== '' && existsSync(join(dir, 'initdb'))) {
      // /usr/local/bin/initdb may be a link into the real bin directory, where postgres lives.
      candidates.push(dirname(realpathSync(join(dir, 'initdb'))));
    }
  }
  const debian = '/usr/lib/postgresql';
  if (existsSync(debian)) {
    const versions = readdirSync(debian)
      .filter((v) => /^\d+(\.\d+)?$/.test(v))
      .sort((a, b) => Number(b) - Number(a));
    candidates.push(...versions.map((v) => join(debian, v, 'bin')));
  }
  const found = candidates.find((dir) => ['initdb', 'pg_ctl', 'postgres'].every((b) => existsSync(join(dir, b))));
  if (found === undefined) {
    throw new Error(MISSING);
  }
  return found;
}

/** Runs a command (as `user` when given, through runuser), failing with its output. */
function runAs(user: string | undefined, cmd: string, args: string[], cwd: string, timeoutMs: number): Promise<string> {
  const [file, argv] = user === undefined ? [cmd, args] : ['runuser', ['-u', user, '--', cmd, ...args]];
  return new Promise((resolve, reject) => {
    execFile(file, argv, { cwd, timeout: timeoutMs, env: { ...process.env, LC_ALL: 'C' } }, (error, stdout, stderr) => {
      if (error !== null) {
        reject(new Error(`${[file, ...argv].join(' ')} failed: ${error.message}\n${stdout}${stderr}`));
      } else {
        resolve(stdout + stderr);
      }
    });
  });
}

/** The uid and gid of a user, from `id`. */
function ids(user: string): { uid: number; gid: number } | undefined {
  const uid = spawnSync('id', ['-u', user], { encoding: 'utf8' });
  const gid = spawnSync('id', ['-g', user], { encoding: 'utf8' });
  if (uid.status !== 0 || gid.status !== 0) {
    return undefined;
  }
  return { uid: Number(uid.stdout.trim()), gid: Number(gid.stdout.trim()) };
}

/**
 * Starts a private PostgreSQL server. initdb and pg_ctl refuse to run as root, so as root they
 * run as the `postgres` user (Debian's package creates it) in a directory that user owns.
 */
export async function startPg(): Promise<PgServer> {
  const bin = findPgBin();
  const root = process.getuid?.() === 0;
  let user: string | undefined;
  const dir = await mkdtemp(join(tmpdir(), 'bridge-pg-'));
  try {
    if (root) {
      const owner = ids('postgres');
      if (owner === undefined) {
        throw new Error(
          'running as root, and initdb refuses root: the tests run PostgreSQL as the `postgres` user, which does not exist ' +
            "(Debian's postgresql package creates it: `apt-get install -y postgresql`)",
        );
      }
      user = 'postgres';
      await chown(dir, owner.uid, owner.gid);
      if (spawnSync('runuser', ['-u', user, '--', 'test', '-w', dir]).status !== 0) {
        throw new Error(`the postgres user cannot write ${dir}: is a directory above it (TMPDIR=${process.env['TMPDIR'] ?? ''}) closed to other users? runuser (util-linux) must be installed`);
      }
    }
    await chmod(dir, 0o700);
    const data = join(dir, 'data');
    const dbUser = 'bridge';
    await runAs(user, join(bin, 'initdb'), ['-D', data, '-U', dbUser, '-A', 'trust', '-E', 'UTF8', '--locale=C', '--no-sync'], dir, 120_000);
    // The port only names the socket file (.s.PGSQL.PORT) in our own directory.
    const port = 5432;
    const options = `-k ${dir} -p ${port} -c listen_addresses= -c fsync=on -c synchronous_commit=on`;
    await runAs(user, join(bin, 'pg_ctl'), ['start', '-D', data, '-w', '-t', '60', '-l', join(dir, 'server.log'), '-o', options], dir, 90_000);
    const stopSync = (): void => {
      spawnSync(user === undefined ? join(bin, 'pg_ctl') : 'runuser', [...(user === undefined ? [] : ['-u', user, '--', join(bin, 'pg_ctl')]), 'stop', '-D', data, '-m', 'immediate', '-w', '-t', '20'], { timeout: 30_000 });
    };
    // If the test process ends without stop() (a crash, a timeout), the server must not outlive it.
    process.once('exit', stopSync);
    let stopped = false;
    return {
      socketDir: dir,
      port,
      user: dbUser,
      database: 'postgres',
      config() {
        return { host: dir, port, user: dbUser, database: 'postgres' };
      },
      connectionString() {
        return `postgres://${dbUser}@/postgres?host=${encodeURIComponent(dir)}&port=${port}`;
      },
      async stop() {
        if (stopped) {
          return;
        }
        stopped = true;
        process.removeListener('exit', stopSync);
        try {
          await runAs(user, join(bin, 'pg_ctl'), ['stop', '-D', data, '-m', 'fast', '-w', '-t', '60'], dir, 90_000);
        } finally {
          await rm(dir, { recursive: true, force: true });
        }
      },
    };
  } catch (e) {
    await rm(dir, { recursive: true, force: true });
    throw e;
  }
}
