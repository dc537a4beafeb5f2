/**
 * Test helper process: holds a shared repository lock (as a long backup or restore would) until
 * its stdin closes. Arguments: repository location, S3 endpoint ('' for none).
 */
import { openRepository } from '../../src/cli/context.ts';

const [repo, endpoint] = process.argv.slice(2);
const r = await openRepository({ repo, s3Endpoint: endpoint || undefined, json: false, quiet: false });
const lock = await r.lock('shared', 'test: long-running backup');
process.stdout.write('locked\n');
process.stdin.on('end', () => {
  void lock.release().then(() => process.exit(0));
});
process.stdin.resume();
