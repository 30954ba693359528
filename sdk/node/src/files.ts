// Files in the platform's state directory: the directory itself (0700, ours, not a link), atomic
// replacement of small files (write, fsync, rename, fsync the directory), and reads of optional files.

import { randomBytes } from 'node:crypto';
import { lstat, mkdir, open, readFile, rename, chmod, unlink } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';

/** Creates `dir` (0700) or checks an existing one: a directory, not a link, ours; sets it 0700. */
export async function ensureStateDir(dir: string): Promise<void> {
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const st = await lstat(dir);
  if (st.isSymbolicLink() || !st.isDirectory()) throw new Error(`state directory ${dir} is not a directory (or is a symbolic link)`);
  const uid = process.getuid?.();
  if (uid !== undefined && st.uid !== uid) throw new Error(`state directory ${dir} belongs to uid ${st.uid}, not to this user (${uid})`);
  if ((st.mode & 0o777) !== 0o700) await chmod(dir, 0o700);
}

/** The file's content, or `undefined` when it does not exist. */
export async function readIfExists(path: string, encoding: 'utf8'): Promise<string | undefined> {
  try {
    return await readFile(path, encoding);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw e;
  }
}

/** Fsyncs a directory, so a rename or a creation in it is durable. */
export async function syncDir(dir: string): Promise<void> {
  const fd = await open(dir, 'r');
  try {
    await fd.sync();
  } finally {
    await fd.close();
  }
}

/** Replaces `path` with `data` atomically and durably, with `mode`. */
export async function writeFileAtomic(path: string, data: string, mode: number): Promise<void> {
  const tmp = join(dirname(path), `.${basename(path)}.${randomBytes(6).toString('hex')}.tmp`);
  const fd = await open(tmp, 'wx', mode);
  try {
    await fd.writeFile(data, 'utf8');
    await fd.sync();
  } catch (e) {
    await fd.close();
    await unlink(tmp).catch(() => undefined);
    throw e;
  }
  await fd.close();
  try {
    await rename(tmp, path);
  } catch (e) {
    await unlink(tmp).catch(() => undefined);
    throw e;
  }
  await syncDir(dirname(path));
}
