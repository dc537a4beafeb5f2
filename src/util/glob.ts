/**
 * Shell-style name patterns (like `find -name`): `*` any run of characters, `?` one character,
 * `[abc]`, `[a-z]`, `[!a-z]` / `[^a-z]` a character class, `\x` the character x itself. A `[`
 * without its closing `]` is a plain character. Patterns match whole names, by code point, case
 * sensitively; `*` also matches a leading dot (as find does).
 *
 * Matching is iterative with a single backtrack point per `*` (the classic wildcard algorithm),
 * so no pattern can make it take exponential time, whatever the name.
 */

type Token =
  | { kind: 'char'; cp: number }
  | { kind: 'any' }
  | { kind: 'star' }
  | { kind: 'class'; negated: boolean; ranges: Array<[number, number]> };

export interface Glob {
  readonly pattern: string;
  matches(name: string): boolean;
}

export function compileGlob(pattern: string): Glob {
  const tokens = tokenize(pattern);
  return { pattern, matches: (name) => matchTokens(tokens, codePoints(name)) };
}

function codePoints(s: string): number[] {
  const out: number[] = [];
  for (const ch of s) out.push(ch.codePointAt(0) as number);
  return out;
}

function tokenize(pattern: string): Token[] {
  const cps = codePoints(pattern);
  const tokens: Token[] = [];
  for (let i = 0; i < cps.length; i++) {
    const c = cps[i];
    if (c === 0x5c /* \ */ && i + 1 < cps.length) {
      tokens.push({ kind: 'char', cp: cps[++i] });
    } else if (c === 0x2a /* * */) {
      // Consecutive stars are one star.
      if (tokens.at(-1)?.kind !== 'star') tokens.push({ kind: 'star' });
    } else if (c === 0x3f /* ? */) {
      tokens.push({ kind: 'any' });
    } else if (c === 0x5b /* [ */) {
      const parsed = parseClass(cps, i);
      if (parsed) {
        tokens.push(parsed.token);
        i = parsed.end;
      } else {
        tokens.push({ kind: 'char', cp: c });
      }
    } else {
      tokens.push({ kind: 'char', cp: c });
    }
  }
  return tokens;
}

/** Parses a class starting at `[` (index `start`); undefined when it is not closed. */
function parseClass(cps: number[], start: number): { token: Token; end: number } | undefined {
  let i = start + 1;
  const negated = cps[i] === 0x21 /* ! */ || cps[i] === 0x5e /* ^ */;
  if (negated) i++;
  const ranges: Array<[number, number]> = [];
  let first = true;
  while (i < cps.length) {
    let c = cps[i];
    if (c === 0x5d /* ] */ && !first) return { token: { kind: 'class', negated, ranges }, end: i };
    first = false;
    if (c === 0x5c && i + 1 < cps.length) c = cps[++i];
    if (cps[i + 1] === 0x2d /* - */ && i + 2 < cps.length && cps[i + 2] !== 0x5d) {
      let hi = cps[i + 2];
      i += 2;
      if (hi === 0x5c && i + 1 < cps.length) hi = cps[++i];
      ranges.push(c <= hi ? [c, hi] : [hi, c]);
    } else {
      ranges.push([c, c]);
    }
    i++;
  }
  return undefined;
}

function matchOne(token: Token, cp: number): boolean {
  switch (token.kind) {
    case 'char':
      return token.cp === cp;
    case 'any':
      return true;
    case 'class':
      return token.ranges.some(([lo, hi]) => cp >= lo && cp <= hi) !== token.negated;
    case 'star':
      return false;
  }
}

function matchTokens(tokens: Token[], name: number[]): boolean {
  let t = 0;
  let n = 0;
  let starT = -1;
  let starN = 0;
  while (n < name.length) {
    if (t < tokens.length && tokens[t].kind === 'star') {
      starT = t++;
      starN = n;
    } else if (t < tokens.length && matchOne(tokens[t], name[n])) {
      t++;
      n++;
    } else if (starT >= 0) {
      // Let the last star swallow one more character and retry from there.
      t = starT + 1;
      n = ++starN;
    } else {
      return false;
    }
  }
  while (t < tokens.length && tokens[t].kind === 'star') t++;
  return t === tokens.length;
}
