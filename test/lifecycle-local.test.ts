/** The lifecycle suite on the local filesystem backend (crash trials: lifecycle-crash-local.test.ts). */
import { lifecycleSuite } from './lifecycle-suite.ts';
import { localFixture } from './helpers/lifecycle-fixtures.ts';

lifecycleSuite(localFixture({ crashTrials: 20, concurrentSeconds: 15 }));
