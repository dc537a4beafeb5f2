#!/usr/bin/env node
/**
 * The `tresor` command. Enables Node's on-disk compile cache before loading the CLI, which cuts
 * start-up (type stripping and compiling ~100 modules) from ~0.5 s to ~0.2 s on every command,
 * and memory by not loading the TypeScript stripper at all once the cache is warm.
 *
 * This one file is JavaScript, not TypeScript: Node runs it before the cache is on, and a
 * TypeScript entry point would load the stripper (a WebAssembly module compiled at every start)
 * just for it. Measured: `tresor --version` in 0.17-0.21 s against 0.26-0.32 s.
 */
import { enableCompileCache } from 'node:module';
import { homedir } from 'node:os';
import { join } from 'node:path';

try {
  const dir = process.env.TRESOR_CACHE_DIR ? join(process.env.TRESOR_CACHE_DIR, 'compile') : join(homedir(), '.cache', 'tresor', 'compile');
  enableCompileCache(dir);
  // Worker threads (the codec pool) read the cache location from the environment. With it they
  // skip loading the TypeScript stripper too: ~20 MiB less per worker.
  process.env.NODE_COMPILE_CACHE ??= dir;
} catch {
  // Only a speed-up: without a writable cache directory Tresor works the same.
}
const { main } = await import('../src/cli/main.ts');
process.exitCode = await main(process.argv.slice(2));
