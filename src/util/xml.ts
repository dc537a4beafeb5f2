/**
 * A small, safe XML parser and writer for the documents Tresor exchanges with libvirt (domain,
 * checkpoint and backup XML) and similar machine-generated XML.
 *
 * Deliberately limited: elements, attributes, text, CDATA, comments and processing instructions
 * (both skipped), the five predefined entities and numeric character references. A DOCTYPE is
 * refused outright, so there are no internal or external entities to expand (no "billion laughs",
 * no file disclosure). Input size, nesting depth, attribute count and node count are bounded, so a
 * hostile document fails with a BadInputError instead of exhausting memory or the stack.
 * Namespaced names (`qemu:commandline`) are kept verbatim; namespaces are not resolved.
 */
import { BadInputError } from './errors.ts';

export interface XmlElement {
  readonly name: string;
  readonly attributes: Readonly<Record<string, string>>;
  /** Child elements and text runs, in document order. */
  readonly children: ReadonlyArray<XmlElement | string>;
}

export interface XmlParseLimits {
  /** Largest document accepted, in characters. Default 16 Mi. */
  maxLength?: number;
  /** Deepest element nesting accepted. Default 256. */
  maxDepth?: number;
  /** Most attributes on one element. Default 256. */
  maxAttributes?: number;
  /** Most elements + text runs in the document. Default 1 Mi. */
  maxNodes?: number;
}

const DEFAULT_LIMITS: Required<XmlParseLimits> = {
  maxLength: 16 * 1024 * 1024,
  maxDepth: 256,
  maxAttributes: 256,
  maxNodes: 1024 * 1024,
};

const PREDEFINED_ENTITIES: Record<string, string> = { lt: '<', gt: '>', amp: '&', quot: '"', apos: "'" };
const NAME_START = /[A-Za-z_:\u00C0-\uFFFF]/;
const NAME_CHAR = /[A-Za-z0-9_:.\-\u00B7\u00C0-\uFFFF]/;

/** Parses a complete document and returns its root element. */
export function parseXml(text: string, limits: XmlParseLimits = {}): XmlElement {
  return new XmlParser(text, { ...DEFAULT_LIMITS, ...limits }).parseDocument();
}

class XmlParser {
  private pos = 0;
  private nodes = 0;
  private readonly text: string;
  private readonly limits: Required<XmlParseLimits>;

  constructor(text: string, limits: Required<XmlParseLimits>) {
    if (text.length > limits.maxLength) {
      throw new BadInputError('xml-too-large', `XML document of ${text.length} characters exceeds the limit of ${limits.maxLength}`);
    }
    this.text = text;
    this.limits = limits;
  }

  parseDocument(): XmlElement {
    if (this.text.charCodeAt(0) === 0xfeff) this.pos = 1;
    this.skipMisc();
    if (!this.text.startsWith('<', this.pos)) this.fail('expected the root element');
    const root = this.parseElement(1);
    this.skipMisc();
    if (this.pos < this.text.length) this.fail('content after the root element');
    return root;
  }

  /** Skips whitespace, comments, processing instructions (incl. the XML declaration); refuses DOCTYPE. */
  private skipMisc(): void {
    for (;;) {
      this.skipWhitespace();
      if (this.text.startsWith('<?', this.pos)) this.skipPast('?>', 'processing instruction');
      else if (this.text.startsWith('<!--', this.pos)) this.skipPast('-->', 'comment');
      else if (this.text.startsWith('<!DOCTYPE', this.pos) || this.text.startsWith('<!doctype', this.pos)) {
        this.fail('DOCTYPE declarations are not accepted');
      } else return;
    }
  }

  private parseElement(depth: number): XmlElement {
    if (depth > this.limits.maxDepth) this.fail(`elements nested deeper than ${this.limits.maxDepth}`);
    this.countNode();
    this.pos++; // '<'
    const name = this.parseName();
    const attributes: Record<string, string> = Object.create(null) as Record<string, string>;
    let attributeCount = 0;
    for (;;) {
      const hadSpace = this.skipWhitespace();
      if (this.text.startsWith('/>', this.pos)) {
        this.pos += 2;
        return { name, attributes, children: [] };
      }
      if (this.text.startsWith('>', this.pos)) {
        this.pos++;
        break;
      }
      if (!hadSpace) this.fail(`expected whitespace, '>' or '/>' in <${name}>`);
      const attributeName = this.parseName();
      if (attributeName in attributes) this.fail(`duplicate attribute '${attributeName}' in <${name}>`);
      if (++attributeCount > this.limits.maxAttributes) this.fail(`more than ${this.limits.maxAttributes} attributes in <${name}>`);
      this.skipWhitespace();
      this.expect('=');
      this.skipWhitespace();
      attributes[attributeName] = this.parseAttributeValue();
    }
    const children = this.parseContent(name, depth);
    return { name, attributes, children };
  }

  private parseContent(parentName: string, depth: number): Array<XmlElement | string> {
    const children: Array<XmlElement | string> = [];
    let text = '';
    const flushText = (): void => {
      if (text === '') return;
      this.countNode();
      children.push(text);
      text = '';
    };
    for (;;) {
      if (this.pos >= this.text.length) this.fail(`<${parentName}> is not closed`);
      const lt = this.text.indexOf('<', this.pos);
      if (lt < 0) this.fail(`<${parentName}> is not closed`);
      if (lt > this.pos) {
        text += this.decodeText(this.text.slice(this.pos, lt));
        this.pos = lt;
      }
      if (this.text.startsWith('</', this.pos)) {
        this.pos += 2;
        const closing = this.parseName();
        if (closing !== parentName) this.fail(`</${closing}> closes <${parentName}>`);
        this.skipWhitespace();
        this.expect('>');
        flushText();
        return children;
      }
      if (this.text.startsWith('<!--', this.pos)) {
        this.skipPast('-->', 'comment');
      } else if (this.text.startsWith('<![CDATA[', this.pos)) {
        const end = this.text.indexOf(']]>', this.pos + 9);
        if (end < 0) this.fail('unterminated CDATA section');
        text += this.text.slice(this.pos + 9, end);
        this.pos = end + 3;
      } else if (this.text.startsWith('<?', this.pos)) {
        this.skipPast('?>', 'processing instruction');
      } else if (this.text.startsWith('<!', this.pos)) {
        this.fail('declarations are not accepted inside elements');
      } else {
        flushText();
        children.push(this.parseElement(depth + 1));
      }
    }
  }

  private parseName(): string {
    const start = this.pos;
    if (!NAME_START.test(this.text.charAt(this.pos))) this.fail('expected a name');
    this.pos++;
    while (this.pos < this.text.length && NAME_CHAR.test(this.text.charAt(this.pos))) this.pos++;
    return this.text.slice(start, this.pos);
  }

  private parseAttributeValue(): string {
    const quote = this.text.charAt(this.pos);
    if (quote !== '"' && quote !== "'") this.fail('expected a quoted attribute value');
    const end = this.text.indexOf(quote, this.pos + 1);
    if (end < 0) this.fail('unterminated attribute value');
    const raw = this.text.slice(this.pos + 1, end);
    if (raw.includes('<')) this.fail("'<' inside an attribute value");
    this.pos = end + 1;
    // Attribute value normalisation: literal whitespace characters become spaces.
    return this.decodeText(raw.replace(/[\t\n\r]/g, ' '));
  }

  private decodeText(raw: string): string {
    if (!raw.includes('&')) return raw;
    return raw.replace(/&([^;&]{0,12});?/g, (match, body: string) => {
      if (!match.endsWith(';')) this.fail(`unterminated entity reference '${match.slice(0, 16)}'`);
      if (body in PREDEFINED_ENTITIES) return PREDEFINED_ENTITIES[body] as string;
      const codePoint = /^#x[0-9a-fA-F]{1,6}$/.test(body) ? Number.parseInt(body.slice(2), 16)
        : /^#[0-9]{1,7}$/.test(body) ? Number.parseInt(body.slice(1), 10) : -1;
      if (codePoint < 0) this.fail(`unknown entity '&${body};'`);
      if (codePoint === 0 || codePoint > 0x10ffff || (codePoint >= 0xd800 && codePoint <= 0xdfff)) {
        this.fail(`invalid character reference '&${body};'`);
      }
      return String.fromCodePoint(codePoint);
    });
  }

  private skipWhitespace(): boolean {
    const start = this.pos;
    while (this.pos < this.text.length && ' \t\r\n'.includes(this.text.charAt(this.pos))) this.pos++;
    return this.pos > start;
  }

  private skipPast(terminator: string, what: string): void {
    const end = this.text.indexOf(terminator, this.pos + 2);
    if (end < 0) this.fail(`unterminated ${what}`);
    this.pos = end + terminator.length;
  }

  private expect(char: string): void {
    if (this.text.charAt(this.pos) !== char) this.fail(`expected '${char}'`);
    this.pos++;
  }

  private countNode(): void {
    if (++this.nodes > this.limits.maxNodes) this.fail(`more than ${this.limits.maxNodes} nodes`);
  }

  private fail(message: string): never {
    const line = this.text.slice(0, this.pos).split('\n').length;
    throw new BadInputError('xml-malformed', `malformed XML at line ${line} (offset ${this.pos}): ${message}`, {
      context: { offset: this.pos, line },
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Navigation helpers
// ---------------------------------------------------------------------------------------------

/** Child elements, optionally only those with the given name. */
export function childElements(element: XmlElement, name?: string): XmlElement[] {
  const out: XmlElement[] = [];
  for (const child of element.children) {
    if (typeof child !== 'string' && (name === undefined || child.name === name)) out.push(child);
  }
  return out;
}

/** The first child element with this name, if any. */
export function childElement(element: XmlElement, name: string): XmlElement | undefined {
  for (const child of element.children) {
    if (typeof child !== 'string' && child.name === name) return child;
  }
  return undefined;
}

/** Follows a path of child element names (`['devices', 'disk']` → first match at each step). */
export function descend(element: XmlElement, ...path: string[]): XmlElement | undefined {
  let current: XmlElement | undefined = element;
  for (const step of path) {
    if (current === undefined) return undefined;
    current = childElement(current, step);
  }
  return current;
}

/** Concatenated text of the element and its descendants. */
export function textContent(element: XmlElement): string {
  let out = '';
  for (const child of element.children) out += typeof child === 'string' ? child : textContent(child);
  return out;
}

/** Trimmed text of a child element, if present. */
export function childText(element: XmlElement, ...path: string[]): string | undefined {
  const target = descend(element, ...path);
  return target === undefined ? undefined : textContent(target).trim();
}

// ---------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------

export function escapeXmlText(value: string): string {
  return value.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}

export function escapeXmlAttribute(value: string): string {
  return escapeXmlText(value).replace(/"/g, '&quot;').replace(/'/g, '&apos;')
    .replace(/\n/g, '&#10;').replace(/\r/g, '&#13;').replace(/\t/g, '&#9;');
}

/** A node for `renderXml`: an element (attributes with `undefined` are left out) or text. */
export type XmlInput = string | {
  name: string;
  attributes?: Record<string, string | number | undefined>;
  children?: Array<XmlInput | undefined | false>;
};

/** Renders elements built in code, indented by two spaces, escaping every text and attribute. */
export function renderXml(node: XmlInput, indent = ''): string {
  if (typeof node === 'string') return indent + escapeXmlText(node);
  if (!/^[A-Za-z_][A-Za-z0-9_:.-]*$/.test(node.name)) throw new Error(`invalid XML element name '${node.name}'`);
  let open = `${indent}<${node.name}`;
  for (const [key, value] of Object.entries(node.attributes ?? {})) {
    if (value !== undefined) open += ` ${key}="${escapeXmlAttribute(String(value))}"`;
  }
  const children = (node.children ?? []).filter((child): child is XmlInput => child !== undefined && child !== false);
  if (children.length === 0) return `${open}/>`;
  if (children.length === 1 && typeof children[0] === 'string') {
    return `${open}>${escapeXmlText(children[0])}</${node.name}>`;
  }
  const inner = children.map((child) => renderXml(child, indent + '  ')).join('\n');
  return `${open}>\n${inner}\n${indent}</${node.name}>`;
}
