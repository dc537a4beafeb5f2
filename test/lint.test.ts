/** Static checks that keep the code base honest: layering and type checking. */
import { it } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { layerViolations } from './lint-layers.ts';

it('every layer imports only from the layers below it', async () => {
  assert.deepEqual(await layerViolations(), []);
});

it('type-checks under strict tsc with erasable syntax only', async () => {
  const root = fileURLToPath(new URL('..', import.meta.url));
  const out = await new Promise<string>((resolve) => {
    execFile(process.execPath, [fileURLToPath(new URL('../node_modules/typescript/bin/tsc', import.meta.url)), '--noEmit', '-p', root], { maxBuffer: 16 << 20, cwd: root }, (err, stdout, stderr) => resolve(err ? `${stdout}${stderr}` : ''));
  });
  assert.equal(out, '', out);
});
