/**
 * Reading libvirt domain XML: identity and disks. The XML comes from libvirt, but it also comes
 * back from repositories (a saved definition), so it goes through the bounded parser and every
 * missing piece is a BadInputError rather than a crash.
 */
import { BadInputError } from '../util/errors.ts';
import { childElement, childElements, childText, parseXml, type XmlElement } from '../util/xml.ts';
import type { DiskInfo } from './types.ts';

export interface DomainIdentity {
  name: string;
  uuid: string | undefined;
  type: string | undefined;
}

export function parseDomainRoot(xml: string): XmlElement {
  const root = parseXml(xml);
  if (root.name !== 'domain') throw new BadInputError('domain-xml-invalid', `expected <domain>, found <${root.name}>`);
  return root;
}

export function domainIdentity(xml: string): DomainIdentity {
  const root = parseDomainRoot(xml);
  const name = childText(root, 'name');
  if (name === undefined || name === '') throw new BadInputError('domain-xml-invalid', 'domain XML has no <name>');
  return { name, uuid: childText(root, 'uuid'), type: root.attributes.type };
}

/** Disks of device type 'disk' from a domain XML, in document order. */
export function parseDomainDisks(xml: string): DiskInfo[] {
  return disksOf(parseDomainRoot(xml));
}

export function disksOf(domain: XmlElement): DiskInfo[] {
  const devices = childElement(domain, 'devices');
  if (devices === undefined) return [];
  const disks: DiskInfo[] = [];
  for (const disk of childElements(devices, 'disk')) {
    if ((disk.attributes.device ?? 'disk') !== 'disk') continue;
    const target = childElement(disk, 'target')?.attributes.dev;
    if (target === undefined || target === '') throw new BadInputError('domain-xml-invalid', 'a <disk> in the domain XML has no <target dev>');
    const source = childElement(disk, 'source');
    const sourceType = disk.attributes.type ?? 'file';
    const info: DiskInfo = {
      target,
      bus: childElement(disk, 'target')?.attributes.bus ?? 'unknown',
      sourceType,
      source: source?.attributes.file ?? source?.attributes.dev ?? undefined,
      format: childElement(disk, 'driver')?.attributes.type,
      readonly: childElement(disk, 'readonly') !== undefined,
      shareable: childElement(disk, 'shareable') !== undefined,
      alias: childElement(disk, 'alias')?.attributes.name,
    };
    if (sourceType === 'network' && source !== undefined) {
      info.network = { protocol: source.attributes.protocol ?? 'unknown', name: source.attributes.name ?? '' };
    }
    disks.push(info);
  }
  return disks;
}
