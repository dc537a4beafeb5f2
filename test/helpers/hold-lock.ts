/** Test helper process: holds an exclusive lock on a repository until its stdin closes. */
import { openRepository } from '../../src/cli/context.ts';

const [repo, endpoint] = process.argv.slice(2);
const r = await openRepository({ repo, s3Endpoint: endpoint || undefined, json: false, quiet: false });
const lock = await r.lock('exclusive', 'test lock holder');
process.stdout.write('locked\n');
process.stdin.on('end', () => {
  void lock.release().then(() => process.exit(0));
});
process.stdin.resume();
