/**
 * A throwaway X.509 PKI for the lab (openssl, EC P-256: fast to generate): a CA, one server
 * certificate valid for the given IP addresses, one client certificate, laid out in QEMU's file
 * names (libvirt's backup_tls_x509_cert_dir on the server side; Tresor's --nbd-tls-dir on the
 * client side).
 */
import { execFile } from 'node:child_process';
import { mkdir, writeFile, copyFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);

export interface LabPki {
  /** ca-cert.pem, server-cert.pem, server-key.pem */
  serverDir: string;
  /** ca-cert.pem, client-cert.pem, client-key.pem */
  clientDir: string;
}

const EC = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];

export async function createLabPki(dir: string, addresses: string[], name = 'tresor-lab'): Promise<LabPki> {
  const work = join(dir, 'work');
  const serverDir = join(dir, 'server');
  const clientDir = join(dir, 'client');
  for (const d of [work, serverDir, clientDir]) await mkdir(d, { recursive: true, mode: 0o700 });
  const caKey = join(work, 'ca-key.pem');
  const caCert = join(work, 'ca-cert.pem');
  await run('openssl', ['req', '-x509', ...EC, '-keyout', caKey, '-out', caCert, '-days', '2', '-subj', `/CN=${name} CA`]);
  const issue = async (role: 'server' | 'client', ext: string, outDir: string) => {
    const key = join(outDir, `${role}-key.pem`);
    const csr = join(work, `${role}.csr`);
    const extFile = join(work, `${role}.ext`);
    await writeFile(extFile, `basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n${ext}\n`);
    await run('openssl', ['req', ...EC, '-keyout', key, '-out', csr, '-subj', `/CN=${name} ${role}`]);
    await run('openssl', ['x509', '-req', '-in', csr, '-CA', caCert, '-CAkey', caKey, '-CAcreateserial', '-out', join(outDir, `${role}-cert.pem`), '-days', '2', '-extfile', extFile]);
  };
  await issue('server', `extendedKeyUsage=serverAuth\nsubjectAltName=${addresses.map((a) => `IP:${a}`).join(',')}`, serverDir);
  await issue('client', 'extendedKeyUsage=clientAuth', clientDir);
  await copyFile(caCert, join(serverDir, 'ca-cert.pem'));
  await copyFile(caCert, join(clientDir, 'ca-cert.pem'));
  await rm(work, { recursive: true, force: true });
  return { serverDir, clientDir };
}
