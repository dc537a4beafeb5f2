/**
 * The lifecycle suite on S3, against a real Ceph radosgw: prune, GC (also beside running backups
 * and after a crash), sync into S3, and SIGKILL trials. The tests of pure repository logic run in
 * lifecycle-local.test.ts; radosgw killed mid-run and storage-enforced append-only protection are
 * in lifecycle-s3-protection.test.ts.
 */
import { crashSuite, lifecycleSuite } from './lifecycle-suite.ts';
import { s3Fixture } from './helpers/lifecycle-fixtures.ts';

lifecycleSuite(s3Fixture({ crashTrials: 10, concurrentSeconds: 12, backendSensitiveOnly: true }));
crashSuite(s3Fixture({ crashTrials: 10, concurrentSeconds: 12, backendSensitiveOnly: true }));
