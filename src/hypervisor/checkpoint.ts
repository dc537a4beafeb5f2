/**
 * libvirt checkpoint XML (formatcheckpoint.rst): reading `<domaincheckpoint>` documents, and
 * writing the small one that creates a checkpoint together with a backup job.
 */
import { BadInputError } from '../util/errors.ts';
import { childElement, childElements, childText, parseXml, renderXml } from '../util/xml.ts';
import type { CheckpointDisk, CheckpointInfo } from './types.ts';

/** Parses a checkpoint XML as `checkpoint-dumpxml` prints it (with or without the domain). */
export function parseCheckpointXml(xml: string): CheckpointInfo {
  const root = parseXml(xml);
  if (root.name !== 'domaincheckpoint') {
    throw new BadInputError('checkpoint-xml-invalid', `expected <domaincheckpoint>, found <${root.name}>`);
  }
  const name = childText(root, 'name');
  if (name === undefined || name === '') throw new BadInputError('checkpoint-xml-invalid', 'checkpoint XML has no <name>');
  const creation = childText(root, 'creationTime');
  const creationTime = creation === undefined ? 0 : Number(creation);
  if (!Number.isSafeInteger(creationTime) || creationTime < 0) {
    throw new BadInputError('checkpoint-xml-invalid', `checkpoint ${name} has an invalid creationTime '${creation}'`);
  }
  const disks: CheckpointDisk[] = [];
  for (const disk of childElements(childElement(root, 'disks') ?? root, 'disk')) {
    const target = disk.attributes.name;
    if (target === undefined) throw new BadInputError('checkpoint-xml-invalid', `a disk of checkpoint ${name} has no name`);
    const entry: CheckpointDisk = { target, checkpoint: disk.attributes.checkpoint ?? 'bitmap', bitmap: disk.attributes.bitmap };
    if (disk.attributes.size !== undefined) {
      const size = Number(disk.attributes.size);
      if (Number.isSafeInteger(size) && size >= 0) entry.size = size;
    }
    disks.push(entry);
  }
  return { name, creationTime, parent: childText(root, 'parent', 'name'), disks, xml };
}

/**
 * The checkpoint XML without its `<parent>`, for redefining it where its parent is unknown (a host
 * it moved to, or after Tresor deleted the parent, which it does once the next backup commits):
 * libvirt refuses to redefine a checkpoint whose parent it does not have, and the bitmap a
 * checkpoint stands for does not depend on its parent.
 */
export function checkpointXmlWithoutParent(xml: string): string {
  const { name, parent } = parseCheckpointXml(xml);
  if (parent === undefined) return xml;
  const escaped = parent.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  const element = new RegExp(`<parent>\\s*<name>${escaped}</name>\\s*</parent>\\s*`);
  const match = element.exec(xml);
  const domainAt = xml.search(/<domain[\s>]/);
  if (match === null || (domainAt >= 0 && match.index > domainAt)) {
    throw new BadInputError('checkpoint-xml-invalid', `checkpoint ${name}: its <parent> element is not where libvirt writes it`);
  }
  const stripped = xml.slice(0, match.index) + xml.slice(match.index + match[0].length);
  const check = parseCheckpointXml(stripped);
  if (check.parent !== undefined || check.name !== name) throw new BadInputError('checkpoint-xml-invalid', `checkpoint ${name}: could not remove its parent`);
  return stripped;
}

/** The checkpoint XML for `backup-begin`: a bitmap on each listed disk, 'no' on every other disk of the domain. */
export function checkpointCreateXml(name: string, bitmapTargets: string[], allTargets: string[]): string {
  return renderXml({
    name: 'domaincheckpoint',
    children: [
      { name: 'name', children: [name] },
      {
        name: 'disks',
        children: allTargets.map((target) => ({
          name: 'disk',
          attributes: { name: target, checkpoint: bitmapTargets.includes(target) ? 'bitmap' : 'no' },
        })),
      },
    ],
  }) + '\n';
}

/** Names usable as checkpoint (and so qcow2 bitmap) names: conservative, no path or XML specials. */
export function validateCheckpointName(name: string): void {
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/.test(name)) {
    throw new BadInputError('checkpoint-name-invalid', `'${name}' is not a valid checkpoint name`, {
      hint: 'use letters, digits, dot, dash and underscore (at most 128 characters), starting with a letter or digit',
    });
  }
}
