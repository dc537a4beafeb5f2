/**
 * Checks the layering of DEVELOPERS.md: each layer imports only from layers below it (and from
 * src/util). Run by `npm run lint` and by test/lint.test.ts.
 */
import { readdir, readFile } from 'node:fs/promises';
import { join, relative, dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', 'src');
/** Rank of each layer; a module may import from its own layer or a lower one. */
const RANK: Record<string, number> = {
  util: 0, store: 1, repo: 2, image: 3, nbd: 3, fs: 3, hypervisor: 4, engine: 5, server: 6, cli: 6, web: 6, agent: 6,
};

async function files(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const e of await readdir(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) out.push(...await files(p));
    else if (e.name.endsWith('.ts')) out.push(p);
  }
  return out;
}

export async function layerViolations(): Promise<string[]> {
  const problems: string[] = [];
  for (const file of await files(ROOT)) {
    const layer = relative(ROOT, file).split('/')[0];
    if (!(layer in RANK)) {
      problems.push(`${relative(ROOT, file)}: unknown layer ${layer} (add it to test/lint-layers.ts)`);
      continue;
    }
    const text = await readFile(file, 'utf8');
    for (const m of text.matchAll(/(?:from|import)\s*\(?\s*'(\.{1,2}\/[^']+)'/g)) {
      const target = relative(ROOT, resolve(dirname(file), m[1])).split('/')[0];
      if (target in RANK && RANK[target] > RANK[layer]) {
        problems.push(`${relative(ROOT, file)} (${layer}) imports ${m[1]} from the higher layer ${target}`);
      }
    }
  }
  return problems;
}

if (import.meta.main) {
  const problems = await layerViolations();
  for (const p of problems) console.error(p);
  console.log(problems.length === 0 ? 'layers: ok' : `layers: ${problems.length} violation(s)`);
  process.exitCode = problems.length === 0 ? 0 : 1;
}
