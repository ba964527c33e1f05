// kiln's JavaScript prelude: what a migrate-mongo migration finds around it.
//
// It is evaluated once in every fresh QuickJS context before any project file.
// The Rust side provides a handful of natives on `globalThis.__kiln_native`
// (run a database command, sessions, module resolution and loading, logging);
// everything a migration calls — `db.collection(...).updateMany(...)`,
// cursors, `require('mongodb').ObjectId`, `console.log`, `process.env` — is
// written here over those natives, modelled on the official Node.js driver
// (v6) so that migrations written for migrate-mongo run unchanged.
//
// Values cross the boundary as canonical Extended JSON text: `toEJSON` turns
// driver values (ObjectId, Date, Long, Decimal128, …) into it, `fromEJSON`
// turns a reply back into them.
//
// Anything the API does not provide throws a TypeError naming the missing
// function and the caller's file and line; nothing is ever a silent no-op.
(function () {
  "use strict";
  const N = globalThis.__kiln_native;
  delete globalThis.__kiln_native;
  const K = {};
  Object.defineProperty(globalThis, "__kiln", { value: K, enumerable: false });

  // ---------------------------------------------------------------- helpers

  // The first stack frame in a project file (an absolute path; the prelude and
  // generated modules have other names): {file, line} as the user wrote them.
  function callerFrame() {
    const stack = String(new Error().stack || "").split("\n");
    for (const line of stack) {
      const m = /\((.*?):(\d+)(?::\d+)?\)\s*$/.exec(line) || /at ([^ ]*?):(\d+)(?::\d+)?\s*$/.exec(line);
      if (!m || !m[1].startsWith("/") || m[1].endsWith("#esm")) continue;
      return { file: N.displayPath(m[1]), line: N.mapLine(m[1], Number(m[2])) };
    }
    return null;
  }

  function unsupported(what) {
    const site = callerFrame();
    const e = new TypeError(
      `${what} is not provided by kiln's MongoDB API${site ? " (called at " + site.file + ":" + site.line + ")" : ""}; ` +
        "nothing was run by this call. Rewrite this step with db.command({...}) (any database command works), " +
        "or see docs/migrate-mongo.md for what is provided"
    );
    e.code = "KILN_UNSUPPORTED";
    if (site) { e.kilnFile = site.file; e.kilnLine = site.line; }
    throw e;
  }

  // Properties that generic code probes (promise resolution, JSON, inspection):
  // reading them must not throw.
  const PROBED = new Set([
    "then", "toJSON", "constructor", "toString", "valueOf", "inspect", "__proto__",
    "asymmetricMatch", "$$typeof", "nodeType", "length", "prototype", "toBSON", "_bsontype",
    "catch", "finally", "hasOwnProperty", "isPrototypeOf", "propertyIsEnumerable", "toLocaleString",
  ]);

  // Wrap an API object so that reading a property it does not have throws.
  function strict(obj, label) {
    return new Proxy(obj, {
      get(target, prop, receiver) {
        if (typeof prop === "symbol" || prop in target || PROBED.has(prop)) {
          return Reflect.get(target, prop, receiver);
        }
        unsupported(`${label}.${String(prop)}`);
      },
    });
  }

  // ------------------------------------------------------------------- BSON

  function hex(bytes) {
    let s = "";
    for (const b of bytes) s += (b < 16 ? "0" : "") + b.toString(16);
    return s;
  }
  let oidCounter = Math.floor(Math.random() * 0xffffff);
  const oidRandom = [0, 0, 0, 0, 0].map(() => Math.floor(Math.random() * 256));

  class ObjectId {
    constructor(id) {
      if (id === undefined || id === null) {
        const t = Math.floor(Date.now() / 1000);
        oidCounter = (oidCounter + 1) % 0xffffff;
        const b = [
          (t >>> 24) & 255, (t >>> 16) & 255, (t >>> 8) & 255, t & 255,
          ...oidRandom,
          (oidCounter >>> 16) & 255, (oidCounter >>> 8) & 255, oidCounter & 255,
        ];
        this._hex = hex(b);
      } else if (id instanceof ObjectId) {
        this._hex = id._hex;
      } else if (typeof id === "string" && /^[0-9a-fA-F]{24}$/.test(id)) {
        this._hex = id.toLowerCase();
      } else if (typeof id === "number") {
        const t = Math.floor(id);
        const b = [(t >>> 24) & 255, (t >>> 16) & 255, (t >>> 8) & 255, t & 255, 0, 0, 0, 0, 0, 0, 0, 0];
        this._hex = hex(b);
      } else if (id && typeof id.toHexString === "function") {
        this._hex = String(id.toHexString()).toLowerCase();
      } else {
        throw new TypeError(`input must be a 24 character hex string, 12 byte Uint8Array, or an integer (got ${String(id)})`);
      }
    }
    static isValid(id) {
      if (id instanceof ObjectId) return true;
      return typeof id === "string" ? /^[0-9a-fA-F]{24}$/.test(id) : typeof id === "number";
    }
    static createFromHexString(s) { return new ObjectId(s); }
    static createFromTime(t) { return new ObjectId(Number(t)); }
    static generate() { return new ObjectId()._hex; }
    toHexString() { return this._hex; }
    toString() { return this._hex; }
    toJSON() { return this._hex; }
    equals(other) {
      if (other === null || other === undefined) return false;
      try { return new ObjectId(other)._hex === this._hex; } catch (_) { return false; }
    }
    getTimestamp() { return new Date(parseInt(this._hex.slice(0, 8), 16) * 1000); }
    get _bsontype() { return "ObjectId"; }
    inspect() { return `new ObjectId("${this._hex}")`; }
  }

  class Long {
    constructor(low, high, unsigned) {
      if (typeof low === "bigint") this._v = BigInt.asIntN(64, low);
      else if (typeof low === "string") this._v = BigInt.asIntN(64, BigInt(low));
      else if (high === undefined) this._v = BigInt(Math.trunc(Number(low || 0)));
      else this._v = BigInt.asIntN(64, (BigInt(high | 0) << 32n) | BigInt(low >>> 0));
      this.unsigned = !!unsigned;
    }
    static fromNumber(n) { return new Long(BigInt(Math.trunc(n))); }
    static fromString(s) { return new Long(BigInt(s)); }
    static fromBigInt(b) { return new Long(b); }
    static fromInt(n) { return new Long(BigInt(n | 0)); }
    static isLong(v) { return v instanceof Long; }
    toString() { return this._v.toString(); }
    toNumber() { return Number(this._v); }
    toBigInt() { return this._v; }
    toJSON() { return this._v.toString(); }
    equals(o) { return o instanceof Long ? o._v === this._v : this._v === BigInt(o); }
    get _bsontype() { return "Long"; }
  }
  Long.ZERO = new Long(0n);
  Long.ONE = new Long(1n);

  class Decimal128 {
    constructor(s) { this._s = String(s); }
    static fromString(s) { return new Decimal128(s); }
    toString() { return this._s; }
    toJSON() { return { $numberDecimal: this._s }; }
    get _bsontype() { return "Decimal128"; }
  }
  class Int32 {
    constructor(v) { this.value = Number(v) | 0; }
    valueOf() { return this.value; }
    toJSON() { return this.value; }
    get _bsontype() { return "Int32"; }
  }
  class Double {
    constructor(v) { this.value = Number(v); }
    valueOf() { return this.value; }
    toJSON() { return this.value; }
    get _bsontype() { return "Double"; }
  }
  class Timestamp {
    constructor(a, b) {
      if (a && typeof a === "object") { this.t = a.t >>> 0; this.i = a.i >>> 0; }
      else { this.i = a >>> 0; this.t = b >>> 0; }
    }
    get high() { return this.t; }
    get low() { return this.i; }
    get _bsontype() { return "Timestamp"; }
  }
  const B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  function toBase64(bytes) {
    let s = "";
    for (let i = 0; i < bytes.length; i += 3) {
      const n = (bytes[i] << 16) | ((bytes[i + 1] || 0) << 8) | (bytes[i + 2] || 0);
      s += B64[(n >> 18) & 63] + B64[(n >> 12) & 63] + (i + 1 < bytes.length ? B64[(n >> 6) & 63] : "=") + (i + 2 < bytes.length ? B64[n & 63] : "=");
    }
    return s;
  }
  function fromBase64(s) {
    const clean = s.replace(/[^A-Za-z0-9+/]/g, "");
    const out = [];
    for (let i = 0; i < clean.length; i += 4) {
      const n = (B64.indexOf(clean[i]) << 18) | (B64.indexOf(clean[i + 1]) << 12) | ((B64.indexOf(clean[i + 2]) & 63) << 6) | (B64.indexOf(clean[i + 3]) & 63);
      out.push((n >> 16) & 255);
      if (clean[i + 2] !== undefined) out.push((n >> 8) & 255);
      if (clean[i + 3] !== undefined) out.push(n & 255);
    }
    return new Uint8Array(out);
  }
  class Binary {
    constructor(buffer, subType) {
      this.buffer = buffer instanceof Uint8Array ? buffer : new Uint8Array(buffer || []);
      this.sub_type = subType || 0;
    }
    get position() { return this.buffer.length; }
    toString(enc) { return enc === "base64" ? toBase64(this.buffer) : hex(this.buffer); }
    get _bsontype() { return "Binary"; }
  }
  class UUID extends Binary {
    constructor(s) {
      const h = (s === undefined ? hex(Array.from({ length: 16 }, () => Math.floor(Math.random() * 256))) : String(s)).replace(/-/g, "");
      const bytes = new Uint8Array(16);
      for (let i = 0; i < 16; i++) bytes[i] = parseInt(h.slice(2 * i, 2 * i + 2), 16);
      if (s === undefined) { bytes[6] = (bytes[6] & 0x0f) | 0x40; bytes[8] = (bytes[8] & 0x3f) | 0x80; }
      super(bytes, 4);
    }
    toHexString() {
      const h = hex(this.buffer);
      return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
    }
    toString() { return this.toHexString(); }
  }
  class MinKey { get _bsontype() { return "MinKey"; } }
  class MaxKey { get _bsontype() { return "MaxKey"; } }
  class BSONRegExp {
    constructor(pattern, options) { this.pattern = pattern; this.options = options || ""; }
    get _bsontype() { return "BSONRegExp"; }
  }
  class Code {
    constructor(code, scope) { this.code = String(code); this.scope = scope; }
    get _bsontype() { return "Code"; }
  }

  // Driver value -> canonical Extended JSON (a JSON-able value).
  function toEJSON(v) {
    if (v === undefined || v === null) return null;
    switch (typeof v) {
      case "string":
      case "boolean":
        return v;
      case "number":
        if (Number.isInteger(v) && v >= -2147483648 && v <= 2147483647) return Object.is(v, -0) ? { $numberDouble: "-0.0" } : v;
        if (Number.isFinite(v)) return Number.isInteger(v) ? { $numberDouble: String(v) + ".0" } : v;
        return { $numberDouble: Number.isNaN(v) ? "NaN" : v > 0 ? "Infinity" : "-Infinity" };
      case "bigint":
        return { $numberLong: BigInt.asIntN(64, v).toString() };
      case "function":
        return { $code: String(v) };
      case "symbol":
        return String(v);
    }
    if (v instanceof Date) return { $date: { $numberLong: String(v.getTime()) } };
    if (v instanceof ObjectId) return { $oid: v._hex };
    if (v instanceof Long) return { $numberLong: v._v.toString() };
    if (v instanceof Decimal128) return { $numberDecimal: v._s };
    if (v instanceof Int32) return { $numberInt: String(v.value) };
    if (v instanceof Double) return toEJSON(v.value) === v.value && !Number.isInteger(v.value) ? v.value : { $numberDouble: Number.isInteger(v.value) ? v.value + ".0" : String(v.value) };
    if (v instanceof Timestamp) return { $timestamp: { t: v.t, i: v.i } };
    if (v instanceof Binary) return { $binary: { base64: toBase64(v.buffer), subType: (v.sub_type < 16 ? "0" : "") + v.sub_type.toString(16) } };
    if (v instanceof Uint8Array) return { $binary: { base64: toBase64(v), subType: "00" } };
    if (v instanceof MinKey) return { $minKey: 1 };
    if (v instanceof MaxKey) return { $maxKey: 1 };
    if (v instanceof RegExp) return { $regularExpression: { pattern: v.source, options: v.flags.split("").filter((f) => "imsux".includes(f)).sort().join("") } };
    if (v instanceof BSONRegExp) return { $regularExpression: { pattern: v.pattern, options: v.options.split("").sort().join("") } };
    if (v instanceof Code) return v.scope ? { $code: v.code, $scope: toEJSON(v.scope) } : { $code: v.code };
    if (v instanceof ClientSession) return null;
    if (Array.isArray(v)) return v.map((x) => (x === undefined ? null : toEJSON(x)));
    if (v instanceof Map) {
      const o = {};
      for (const [k, x] of v) o[k] = toEJSON(x);
      return o;
    }
    if (typeof v.toBSON === "function") return toEJSON(v.toBSON());
    const o = {};
    for (const k of Object.keys(v)) {
      const x = v[k];
      if (x === undefined || typeof x === "function") continue;
      o[k] = toEJSON(x);
    }
    return o;
  }

  // Extended JSON of a reply -> driver values (the Node.js driver's defaults:
  // int32, int64 and double become numbers, an int64 that does not fit a double exactly stays a Long).
  function fromEJSON(v) {
    if (v === null || typeof v !== "object") return v;
    if (Array.isArray(v)) return v.map(fromEJSON);
    const keys = Object.keys(v);
    if (keys.length >= 1 && keys[0][0] === "$") {
      const k = keys[0];
      if (k === "$oid" && keys.length === 1) return new ObjectId(v.$oid);
      if (k === "$date" && keys.length === 1) {
        const d = v.$date;
        if (typeof d === "string") return new Date(d);
        if (d && d.$numberLong !== undefined) return new Date(Number(d.$numberLong));
        return new Date(d);
      }
      if (k === "$numberLong" && keys.length === 1) {
        const b = BigInt(v.$numberLong);
        return b >= -9007199254740991n && b <= 9007199254740991n ? Number(b) : new Long(b);
      }
      if (k === "$numberInt" && keys.length === 1) return Number(v.$numberInt);
      if (k === "$numberDouble" && keys.length === 1) return Number(v.$numberDouble === "-0.0" ? -0 : v.$numberDouble);
      if (k === "$numberDecimal" && keys.length === 1) return new Decimal128(v.$numberDecimal);
      if (k === "$binary" && keys.length === 1) {
        const sub = parseInt(v.$binary.subType, 16);
        const bytes = fromBase64(v.$binary.base64);
        if (sub === 4 && bytes.length === 16) {
          const u = new UUID(hex(bytes));
          return u;
        }
        return new Binary(bytes, sub);
      }
      if (k === "$timestamp" && keys.length === 1) return new Timestamp({ t: v.$timestamp.t, i: v.$timestamp.i });
      if (k === "$regularExpression" && keys.length === 1) {
        const { pattern, options } = v.$regularExpression;
        try { return new RegExp(pattern, options.replace(/[^gimsuy]/g, "")); } catch (_) { return new BSONRegExp(pattern, options); }
      }
      if (k === "$minKey") return new MinKey();
      if (k === "$maxKey") return new MaxKey();
      if (k === "$undefined") return undefined;
      if (k === "$symbol") return v.$symbol;
      if (k === "$code") return new Code(v.$code, v.$scope && fromEJSON(v.$scope));
    }
    const o = {};
    for (const key of keys) o[key] = fromEJSON(v[key]);
    return o;
  }

  // ---------------------------------------------------------------- errors

  class MongoError extends Error {
    constructor(message) { super(message); this.name = "MongoError"; }
  }
  class MongoServerError extends MongoError {
    constructor(reply) {
      super(reply.errmsg || reply.message || "command failed");
      this.name = "MongoServerError";
      Object.assign(this, reply);
      this.message = reply.errmsg || reply.message || "command failed";
    }
    hasErrorLabel(l) { return (this.errorLabels || []).includes(l); }
  }
  class MongoBulkWriteError extends MongoServerError {
    constructor(reply, result) {
      super(reply);
      this.name = "MongoBulkWriteError";
      this.result = result;
      this.writeErrors = reply.writeErrors;
    }
  }
  class MongoInvalidArgumentError extends MongoError {
    constructor(m) { super(m); this.name = "MongoInvalidArgumentError"; }
  }

  // ------------------------------------------------------- running commands

  // Run `cmd` (a driver value) on database `dbName`; the reply as driver values.
  // `opts.session` runs it in that session (and its transaction, if any).
  function command(dbName, cmd, opts) {
    const session = opts && opts.session instanceof ClientSession ? opts.session : null;
    if (session) session._check();
    const text = N.command(dbName, JSON.stringify(toEJSON(cmd)), session ? session._id : 0);
    const reply = fromEJSON(JSON.parse(text));
    if (reply && reply.$kilnError) {
      const e = reply.$kilnError;
      throw new MongoServerError({ ok: 0, errmsg: e.message, code: e.code, codeName: e.codeName, errorLabels: e.labels || [] });
    }
    return reply;
  }
  K.command = command;

  function writeFailure(reply, result) {
    if (reply.writeErrors && reply.writeErrors.length) {
      const first = reply.writeErrors[0];
      const err = new MongoBulkWriteError({ ok: 1, errmsg: first.errmsg, code: first.code, codeName: first.codeName, writeErrors: reply.writeErrors }, result);
      err.index = first.index;
      throw err;
    }
    if (reply.writeConcernError) {
      throw new MongoServerError({ ok: 1, errmsg: reply.writeConcernError.errmsg, code: reply.writeConcernError.code, writeConcernError: reply.writeConcernError });
    }
  }

  // Options shared by write commands, in the command's spelling.
  function pick(src, names) {
    const out = {};
    if (!src) return out;
    for (const n of names) if (src[n] !== undefined) out[n] = src[n];
    return out;
  }

  // --------------------------------------------------------------- cursors

  // A cursor id is a 64-bit integer the server wants back as one; 0 (null here) means exhausted.
  function cursorId(id) {
    if (id === undefined || id === null) return null;
    const l = id instanceof Long ? id : Long.fromNumber(Number(id));
    return l._v === 0n ? null : l;
  }

  class AbstractCursor {
    constructor(coll, opts) {
      this._coll = coll;
      this._opts = opts || {};
      this._buffer = null;
      this._id = null;
      this._closed = false;
      this._mappers = [];
    }
    _first() { throw new Error("abstract"); }
    _fill() {
      if (this._buffer === null) {
        const reply = this._first();
        this._id = cursorId(reply.cursor.id);
        this._ns = reply.cursor.ns;
        this._buffer = reply.cursor.firstBatch || [];
        return;
      }
      if (this._buffer.length === 0 && this._id) {
        const [db, ...rest] = this._ns.split(".");
        const cmd = { getMore: this._id, collection: rest.join(".") };
        if (this._opts.batchSize) cmd.batchSize = this._opts.batchSize;
        const reply = command(db, cmd, this._opts);
        this._id = cursorId(reply.cursor.id);
        this._buffer = reply.cursor.nextBatch || [];
      }
    }
    _apply(doc) {
      for (const f of this._mappers) doc = f(doc);
      return doc;
    }
    async hasNext() {
      if (this._closed) return false;
      this._fill();
      return this._buffer.length > 0;
    }
    async next() {
      if (this._closed) return null;
      this._fill();
      if (this._buffer.length === 0) return null;
      return this._apply(this._buffer.shift());
    }
    async tryNext() { return this.next(); }
    async toArray() {
      const out = [];
      for (;;) {
        this._fill();
        if (this._buffer.length === 0) break;
        while (this._buffer.length) out.push(this._apply(this._buffer.shift()));
      }
      return out;
    }
    async forEach(fn) {
      for (;;) {
        this._fill();
        if (this._buffer.length === 0) break;
        while (this._buffer.length) {
          const r = await fn(this._apply(this._buffer.shift()));
          if (r === false) return;
        }
      }
    }
    map(fn) { this._mappers.push(fn); return this; }
    batchSize(n) { this._opts.batchSize = n; return this; }
    async close() {
      if (this._id && this._ns) {
        const [db, ...rest] = this._ns.split(".");
        try { command(db, { killCursors: rest.join("."), cursors: [this._id] }, this._opts); } catch (_) { /* the server forgets it anyway */ }
      }
      this._closed = true;
      this._id = null;
      this._buffer = [];
    }
    rewind() { this._buffer = null; this._id = null; this._closed = false; return this; }
    [Symbol.asyncIterator]() {
      const self = this;
      return { next: async () => { const d = await self.next(); return d === null ? { done: true, value: undefined } : { done: false, value: d }; }, return: async () => { await self.close(); return { done: true }; } };
    }
    async *stream() { for (;;) { const d = await this.next(); if (d === null) return; yield d; } }
  }

  class FindCursor extends AbstractCursor {
    constructor(coll, filter, opts) {
      super(coll, Object.assign({}, opts));
      this._filter = filter || {};
    }
    _first() {
      const o = this._opts;
      const cmd = { find: this._coll.collectionName, filter: this._filter };
      if (o.sort) cmd.sort = normalizeSort(o.sort);
      if (o.projection || o.project || o.fields) cmd.projection = o.projection || o.project || o.fields;
      if (o.skip) cmd.skip = o.skip;
      if (o.limit) { cmd.limit = Math.abs(o.limit); if (o.limit < 0) cmd.singleBatch = true; }
      if (o.batchSize) cmd.batchSize = o.batchSize;
      if (o.hint) cmd.hint = o.hint;
      if (o.collation) cmd.collation = o.collation;
      if (o.maxTimeMS) cmd.maxTimeMS = o.maxTimeMS;
      if (o.allowDiskUse) cmd.allowDiskUse = true;
      if (o.min) cmd.min = o.min;
      if (o.max) cmd.max = o.max;
      if (o.noCursorTimeout) cmd.noCursorTimeout = true;
      if (o.comment) cmd.comment = o.comment;
      return command(this._coll.dbName, cmd, o);
    }
    sort(s, dir) { this._opts.sort = dir === undefined ? s : [[s, dir]]; return this; }
    limit(n) { this._opts.limit = n; return this; }
    skip(n) { this._opts.skip = n; return this; }
    project(p) { this._opts.projection = p; return this; }
    hint(h) { this._opts.hint = h; return this; }
    collation(c) { this._opts.collation = c; return this; }
    maxTimeMS(n) { this._opts.maxTimeMS = n; return this; }
    allowDiskUse(b) { this._opts.allowDiskUse = b !== false; return this; }
    filter(f) { this._filter = f; return this; }
    comment(c) { this._opts.comment = c; return this; }
    addCursorFlag(flag, v) { if (flag === "noCursorTimeout") this._opts.noCursorTimeout = v; return this; }
    clone() { const c = new FindCursor(this._coll, this._filter, Object.assign({}, this._opts)); c._mappers = this._mappers.slice(); return strict(c, "FindCursor"); }
    async count() {
      const r = command(this._coll.dbName, { count: this._coll.collectionName, query: this._filter, ...pick(this._opts, ["limit", "skip", "hint"]) }, this._opts);
      return r.n;
    }
  }

  class AggregationCursor extends AbstractCursor {
    constructor(coll, pipeline, opts) {
      super(coll, Object.assign({}, opts));
      this._pipeline = pipeline || [];
    }
    _first() {
      const o = this._opts;
      const cmd = { aggregate: this._coll ? this._coll.collectionName : 1, pipeline: this._pipeline, cursor: o.batchSize ? { batchSize: o.batchSize } : {} };
      Object.assign(cmd, pick(o, ["allowDiskUse", "collation", "hint", "maxTimeMS", "let", "comment"]));
      return command(this._coll ? this._coll.dbName : this._dbName, cmd, o);
    }
    _stage(s) { this._pipeline.push(s); return this; }
    match(m) { return this._stage({ $match: m }); }
    project(p) { return this._stage({ $project: p }); }
    sort(s) { return this._stage({ $sort: normalizeSort(s) }); }
    limit(n) { return this._stage({ $limit: n }); }
    skip(n) { return this._stage({ $skip: n }); }
    group(g) { return this._stage({ $group: g }); }
    unwind(u) { return this._stage({ $unwind: u }); }
    lookup(l) { return this._stage({ $lookup: l }); }
    addStage(s) { return this._stage(s); }
    out(o) { return this._stage({ $out: o }); }
  }

  class ListCursor extends AbstractCursor {
    constructor(db, build, opts) {
      super(null, Object.assign({}, opts));
      this._db = db;
      this._build = build;
    }
    _first() { return command(this._db, this._build(), this._opts); }
  }

  function normalizeSort(s) {
    if (typeof s === "string") return { [s]: 1 };
    if (Array.isArray(s)) {
      const o = {};
      if (s.length === 2 && typeof s[0] === "string" && !Array.isArray(s[1]) && (typeof s[1] === "number" || typeof s[1] === "string")) {
        o[s[0]] = dirOf(s[1]);
        return o;
      }
      for (const item of s) {
        if (Array.isArray(item)) o[item[0]] = dirOf(item[1]);
        else o[item] = 1;
      }
      return o;
    }
    if (s instanceof Map) {
      const o = {};
      for (const [k, d] of s) o[k] = dirOf(d);
      return o;
    }
    const o = {};
    for (const k of Object.keys(s)) o[k] = dirOf(s[k]);
    return o;
  }
  function dirOf(d) {
    if (d === "asc" || d === "ascending") return 1;
    if (d === "desc" || d === "descending") return -1;
    return d;
  }

  // ---------------------------------------------------------- collections

  function indexKeys(spec) {
    if (typeof spec === "string") return { [spec]: 1 };
    if (Array.isArray(spec)) {
      const o = {};
      for (const item of spec) {
        if (Array.isArray(item)) o[item[0]] = item[1];
        else if (typeof item === "string") o[item] = 1;
        else Object.assign(o, item);
      }
      return o;
    }
    if (spec instanceof Map) return Object.fromEntries(spec);
    return spec;
  }
  function indexName(keys) {
    return Object.keys(keys).map((k) => `${k}_${keys[k]}`).join("_");
  }

  function ensureId(doc) {
    if (doc && typeof doc === "object" && doc._id === undefined) {
      // The driver adds the `_id` to the caller's document, and so does kiln.
      const id = new ObjectId();
      const rest = Object.assign({}, doc);
      for (const k of Object.keys(doc)) delete doc[k];
      doc._id = id;
      Object.assign(doc, rest);
    }
    return doc;
  }

  const WRITE_OPTS = ["writeConcern", "bypassDocumentValidation", "comment", "let"];

  class Collection {
    constructor(db, name) {
      this._db = db;
      this.collectionName = name;
      this.dbName = db.databaseName;
      this.namespace = `${db.databaseName}.${name}`;
    }
    get s() { return { db: this._db, namespace: { db: this.dbName, collection: this.collectionName } }; }
    get db() { return this._db; }

    async insertOne(doc, opts) {
      ensureId(doc);
      const reply = command(this.dbName, { insert: this.collectionName, documents: [doc], ...pick(opts, WRITE_OPTS) }, opts);
      writeFailure(reply, { insertedCount: 0 });
      return { acknowledged: true, insertedId: doc._id };
    }
    async insertMany(docs, opts) {
      if (!Array.isArray(docs)) throw new MongoInvalidArgumentError('Argument "docs" must be an array of documents');
      docs.forEach(ensureId);
      const ordered = !opts || opts.ordered !== false;
      const insertedIds = {};
      let n = 0;
      for (let i = 0; i < docs.length; i += 1000) {
        const part = docs.slice(i, i + 1000);
        const reply = command(this.dbName, { insert: this.collectionName, documents: part, ordered, ...pick(opts, WRITE_OPTS) }, opts);
        const failed = new Set((reply.writeErrors || []).map((w) => w.index));
        part.forEach((d, j) => { if (!failed.has(j) && (!ordered || !reply.writeErrors || j < reply.writeErrors[0].index)) insertedIds[i + j] = d._id; });
        n += reply.n || 0;
        writeFailure(reply, { insertedCount: n, insertedIds });
      }
      return { acknowledged: true, insertedCount: n, insertedIds };
    }
    _update(filter, update, opts, multi, replace) {
      if (!replace && !Array.isArray(update) && update && Object.keys(update).some((k) => k[0] !== "$")) {
        throw new MongoInvalidArgumentError("Update document requires atomic operators");
      }
      const u = { q: filter || {}, u: update, multi: !!multi, upsert: !!(opts && opts.upsert) };
      Object.assign(u, pick(opts, ["arrayFilters", "collation", "hint"]));
      const reply = command(this.dbName, { update: this.collectionName, updates: [u], ...pick(opts, WRITE_OPTS) }, opts);
      writeFailure(reply, {});
      const upserted = reply.upserted && reply.upserted.length ? reply.upserted[0]._id : null;
      return {
        acknowledged: true,
        matchedCount: (reply.n || 0) - (upserted !== null ? 1 : 0),
        modifiedCount: reply.nModified || 0,
        upsertedCount: upserted !== null ? 1 : 0,
        upsertedId: upserted,
      };
    }
    async updateOne(filter, update, opts) { return this._update(filter, update, opts, false, false); }
    async updateMany(filter, update, opts) { return this._update(filter, update, opts, true, false); }
    async replaceOne(filter, doc, opts) {
      if (doc && Object.keys(doc).some((k) => k[0] === "$")) throw new MongoInvalidArgumentError("Replacement document must not contain atomic operators");
      return this._update(filter, doc, opts, false, true);
    }
    _delete(filter, opts, limit) {
      const d = { q: filter || {}, limit };
      Object.assign(d, pick(opts, ["collation", "hint"]));
      const reply = command(this.dbName, { delete: this.collectionName, deletes: [d], ...pick(opts, WRITE_OPTS) }, opts);
      writeFailure(reply, {});
      return { acknowledged: true, deletedCount: reply.n || 0 };
    }
    async deleteOne(filter, opts) { return this._delete(filter, opts, 1); }
    async deleteMany(filter, opts) { return this._delete(filter, opts, 0); }
    async remove(filter, opts) { return this._delete(filter, opts, opts && opts.single ? 1 : 0); }

    find(filter, opts) { return strict(new FindCursor(this, filter, opts), "FindCursor"); }
    async findOne(filter, opts) {
      const c = new FindCursor(this, filter, Object.assign({}, opts, { limit: -1 }));
      return c.next();
    }
    _findAndModify(filter, extra, opts) {
      const cmd = { findAndModify: this.collectionName, query: filter || {}, ...extra };
      if (opts) {
        if (opts.sort) cmd.sort = normalizeSort(opts.sort);
        if (opts.projection) cmd.fields = opts.projection;
        if (opts.upsert) cmd.upsert = true;
        if (opts.returnDocument === "after" || opts.returnOriginal === false || opts.new === true) cmd.new = true;
        Object.assign(cmd, pick(opts, ["arrayFilters", "collation", "hint", ...WRITE_OPTS]));
      }
      const reply = command(this.dbName, cmd, opts);
      if (opts && opts.includeResultMetadata) return { value: reply.value, lastErrorObject: reply.lastErrorObject, ok: reply.ok };
      return reply.value === undefined ? null : reply.value;
    }
    async findOneAndUpdate(filter, update, opts) { return this._findAndModify(filter, { update }, opts); }
    async findOneAndReplace(filter, doc, opts) { return this._findAndModify(filter, { update: doc }, opts); }
    async findOneAndDelete(filter, opts) { return this._findAndModify(filter, { remove: true }, opts); }

    aggregate(pipeline, opts) { return strict(new AggregationCursor(this, pipeline, opts), "AggregationCursor"); }
    async countDocuments(filter, opts) {
      const pipeline = [{ $match: filter || {} }];
      if (opts && opts.skip) pipeline.push({ $skip: opts.skip });
      if (opts && opts.limit) pipeline.push({ $limit: opts.limit });
      pipeline.push({ $group: { _id: 1, n: { $sum: 1 } } });
      const docs = await new AggregationCursor(this, pipeline, opts).toArray();
      return docs.length ? Number(docs[0].n) : 0;
    }
    async estimatedDocumentCount(opts) {
      const r = command(this.dbName, { count: this.collectionName }, opts);
      return Number(r.n);
    }
    async count(filter, opts) {
      const r = command(this.dbName, { count: this.collectionName, query: filter || {}, ...pick(opts, ["limit", "skip", "hint"]) }, opts);
      return Number(r.n);
    }
    async distinct(key, filter, opts) {
      const r = command(this.dbName, { distinct: this.collectionName, key, query: filter || {}, ...pick(opts, ["collation", "comment"]) }, opts);
      return r.values;
    }

    async bulkWrite(ops, opts) {
      if (!Array.isArray(ops)) throw new MongoInvalidArgumentError("bulkWrite takes an array of operations");
      const ordered = !opts || opts.ordered !== false;
      const result = { acknowledged: true, insertedCount: 0, matchedCount: 0, modifiedCount: 0, deletedCount: 0, upsertedCount: 0, insertedIds: {}, upsertedIds: {} };
      // Consecutive operations of one kind go in one command, in order.
      const runs = [];
      ops.forEach((op, index) => {
        const kind = Object.keys(op)[0];
        const a = op[kind];
        let type, item;
        switch (kind) {
          case "insertOne": type = "insert"; item = ensureId(a.document || a); result.insertedIds[index] = item._id; break;
          case "updateOne":
          case "updateMany":
            type = "update";
            item = { q: a.filter || {}, u: a.update, multi: kind === "updateMany", upsert: !!a.upsert, ...pick(a, ["arrayFilters", "collation", "hint"]) };
            break;
          case "replaceOne": type = "update"; item = { q: a.filter || {}, u: a.replacement, multi: false, upsert: !!a.upsert, ...pick(a, ["collation", "hint"]) }; break;
          case "deleteOne":
          case "deleteMany": type = "delete"; item = { q: a.filter || {}, limit: kind === "deleteOne" ? 1 : 0, ...pick(a, ["collation", "hint"]) }; break;
          default: unsupported(`bulkWrite operation ${kind}`);
        }
        const last = runs[runs.length - 1];
        if (last && last.type === type && last.items.length < 1000) { last.items.push(item); last.index.push(index); }
        else runs.push({ type, items: [item], index: [index] });
      });
      for (const run of runs) {
        const field = run.type === "insert" ? "documents" : run.type === "update" ? "updates" : "deletes";
        const reply = command(this.dbName, { [run.type]: this.collectionName, [field]: run.items, ordered, ...pick(opts, WRITE_OPTS) }, opts);
        if (run.type === "insert") result.insertedCount += reply.n || 0;
        if (run.type === "delete") result.deletedCount += reply.n || 0;
        if (run.type === "update") {
          const ups = reply.upserted || [];
          result.matchedCount += (reply.n || 0) - ups.length;
          result.modifiedCount += reply.nModified || 0;
          result.upsertedCount += ups.length;
          for (const u of ups) result.upsertedIds[run.index[u.index]] = u._id;
        }
        if (reply.writeErrors) reply.writeErrors.forEach((w) => { w.index = run.index[w.index]; });
        writeFailure(reply, result);
      }
      result.insertedCount = Object.keys(result.insertedIds).length && result.insertedCount;
      return result;
    }
    initializeOrderedBulkOp(opts) { return strict(new BulkOp(this, true, opts), "OrderedBulkOperation"); }
    initializeUnorderedBulkOp(opts) { return strict(new BulkOp(this, false, opts), "UnorderedBulkOperation"); }

    async createIndex(spec, opts) {
      const key = indexKeys(spec);
      const index = Object.assign({ key, name: indexName(key) }, opts || {});
      delete index.session;
      for (const k of ["writeConcern", "commitQuorum", "maxTimeMS", "comment"]) delete index[k];
      command(this.dbName, { createIndexes: this.collectionName, indexes: [index], ...pick(opts, ["commitQuorum", "maxTimeMS", "writeConcern", "comment"]) }, opts);
      return index.name;
    }
    async createIndexes(specs, opts) {
      const indexes = specs.map((s) => {
        const key = indexKeys(s.key);
        return Object.assign({}, s, { key, name: s.name || indexName(key) });
      });
      command(this.dbName, { createIndexes: this.collectionName, indexes, ...pick(opts, ["commitQuorum", "maxTimeMS", "writeConcern"]) }, opts);
      return indexes.map((i) => i.name);
    }
    async ensureIndex(spec, opts) { return this.createIndex(spec, opts); }
    async dropIndex(name, opts) {
      return command(this.dbName, { dropIndexes: this.collectionName, index: typeof name === "string" ? name : indexKeys(name) }, opts);
    }
    async dropIndexes(opts) {
      command(this.dbName, { dropIndexes: this.collectionName, index: "*" }, opts);
      return true;
    }
    listIndexes(opts) {
      const self = this;
      return strict(new ListCursor(this.dbName, () => ({ listIndexes: self.collectionName, cursor: {} }), opts), "ListIndexesCursor");
    }
    async indexes(opts) {
      try {
        return await this.listIndexes(opts).toArray();
      } catch (e) {
        if (e.code === 26) return [];
        throw e;
      }
    }
    async indexExists(names, opts) {
      const have = new Set((await this.indexes(opts)).map((i) => i.name));
      return (Array.isArray(names) ? names : [names]).every((n) => have.has(n));
    }
    async indexInformation(opts) {
      const out = {};
      for (const i of await this.indexes(opts)) out[i.name] = Object.entries(i.key);
      return out;
    }
    async rename(newName, opts) {
      command("admin", { renameCollection: this.namespace, to: `${this.dbName}.${newName}`, dropTarget: !!(opts && opts.dropTarget) }, opts);
      return this._db.collection(newName);
    }
    async drop(opts) {
      try {
        command(this.dbName, { drop: this.collectionName }, opts);
        return true;
      } catch (e) {
        if (e.code === 26) return false;
        throw e;
      }
    }
    async options(opts) {
      const r = command(this.dbName, { listCollections: 1, filter: { name: this.collectionName } }, opts);
      const c = r.cursor.firstBatch[0];
      if (!c) throw new MongoError(`Collection ${this.namespace} not found`);
      return c.options || {};
    }
    async isCapped(opts) { return !!(await this.options(opts)).capped; }
  }

  class BulkOp {
    constructor(coll, ordered, opts) { this._coll = coll; this._ops = []; this._opts = Object.assign({}, opts, { ordered }); }
    insert(doc) { this._ops.push({ insertOne: { document: doc } }); return this; }
    find(filter) {
      const ops = this._ops;
      let upsert = false;
      const f = {
        upsert() { upsert = true; return f; },
        updateOne(u) { ops.push({ updateOne: { filter, update: u, upsert } }); return f; },
        update(u) { ops.push({ updateMany: { filter, update: u, upsert } }); return f; },
        replaceOne(r) { ops.push({ replaceOne: { filter, replacement: r, upsert } }); return f; },
        deleteOne() { ops.push({ deleteOne: { filter } }); return f; },
        delete() { ops.push({ deleteMany: { filter } }); return f; },
      };
      return strict(f, "bulk.find(...)");
    }
    get length() { return this._ops.length; }
    async execute() { return this._coll.bulkWrite(this._ops, this._opts); }
  }

  // ------------------------------------------------------------ databases

  class Db {
    constructor(client, name) {
      this._client = client;
      this.databaseName = name;
    }
    get client() { return this._client; }
    collection(name) {
      if (typeof name !== "string" || !name) throw new MongoInvalidArgumentError("collection names must be non-empty strings");
      return strict(new Collection(this, name), `db.collection("${name}")`);
    }
    async createCollection(name, opts) {
      const cmd = { create: name };
      if (opts) for (const k of Object.keys(opts)) if (k !== "session") cmd[k] = opts[k];
      command(this.databaseName, cmd, opts);
      return this.collection(name);
    }
    listCollections(filter, opts) {
      const self = this;
      return strict(
        new ListCursor(this.databaseName, () => ({ listCollections: 1, filter: filter || {}, cursor: {}, ...pick(opts, ["nameOnly", "authorizedCollections"]) }), opts),
        "ListCollectionsCursor"
      );
    }
    async collections(opts) {
      const list = await this.listCollections({}, { nameOnly: true, ...(opts || {}) }).toArray();
      return list.filter((c) => !c.name.startsWith("system.")).map((c) => this.collection(c.name));
    }
    async command(cmd, opts) { return command(this.databaseName, cmd, opts); }
    async runCommand(cmd, opts) { return command(this.databaseName, cmd, opts); }
    async dropCollection(name, opts) {
      try {
        command(this.databaseName, { drop: name }, opts);
        return true;
      } catch (e) {
        if (e.code === 26) return false;
        throw e;
      }
    }
    async renameCollection(from, to, opts) {
      command("admin", { renameCollection: `${this.databaseName}.${from}`, to: `${this.databaseName}.${to}`, dropTarget: !!(opts && opts.dropTarget) }, opts);
      return this.collection(to);
    }
    async dropDatabase(opts) { command(this.databaseName, { dropDatabase: 1 }, opts); return true; }
    async createIndex(name, spec, opts) { return this.collection(name).createIndex(spec, opts); }
    async indexInformation(name, opts) { return this.collection(name).indexInformation(opts); }
    async stats(opts) { return command(this.databaseName, { dbStats: 1 }, opts); }
    aggregate(pipeline, opts) {
      const c = new AggregationCursor(null, pipeline, opts);
      c._dbName = this.databaseName;
      return strict(c, "AggregationCursor");
    }
    admin() { return strict(new Admin(this._client), "db.admin()"); }
    db(name) { return this._client.db(name); }
  }

  class Admin {
    constructor(client) { this._client = client; }
    async command(cmd, opts) { return command("admin", cmd, opts); }
    async listDatabases(opts) { return command("admin", { listDatabases: 1, ...pick(opts, ["nameOnly", "filter"]) }, opts); }
    async serverInfo() { return command("admin", { buildInfo: 1 }); }
    async buildInfo() { return command("admin", { buildInfo: 1 }); }
    async ping() { return command("admin", { ping: 1 }); }
  }

  // -------------------------------------------------------------- sessions

  class ClientSession {
    constructor(id) { this._id = id; this._ended = false; this._inTxn = false; }
    _check() { if (this._ended) throw new MongoError("Cannot use a session that has ended"); }
    get id() { return { id: this._id }; }
    inTransaction() { return this._inTxn; }
    startTransaction(opts) {
      this._check();
      N.session("start_transaction", this._id, JSON.stringify(toEJSON(opts || {})));
      this._inTxn = true;
    }
    async commitTransaction() {
      this._check();
      const r = JSON.parse(N.session("commit", this._id, ""));
      this._inTxn = false;
      if (r && r.$kilnError) throw new MongoServerError({ ok: 0, errmsg: r.$kilnError.message, code: r.$kilnError.code, codeName: r.$kilnError.codeName, errorLabels: r.$kilnError.labels || [] });
    }
    async abortTransaction() {
      this._check();
      N.session("abort", this._id, "");
      this._inTxn = false;
    }
    async withTransaction(fn, opts) {
      for (let attempt = 0; ; attempt++) {
        this.startTransaction(opts);
        let value;
        try {
          value = await fn(this);
        } catch (e) {
          if (this._inTxn) await this.abortTransaction();
          if (e && typeof e.hasErrorLabel === "function" && e.hasErrorLabel("TransientTransactionError") && attempt < 3) continue;
          throw e;
        }
        if (!this._inTxn) return value;
        try {
          await this.commitTransaction();
          return value;
        } catch (e) {
          if (e && typeof e.hasErrorLabel === "function" && e.hasErrorLabel("TransientTransactionError") && attempt < 3) continue;
          throw e;
        }
      }
    }
    async endSession() {
      if (this._ended) return;
      if (this._inTxn) await this.abortTransaction();
      N.session("end", this._id, "");
      this._ended = true;
    }
  }

  class MongoClient {
    constructor(defaultDb) {
      this._default = defaultDb;
      this._dbs = new Map();
    }
    db(name) {
      const n = name || this._default;
      if (!this._dbs.has(n)) this._dbs.set(n, strict(new Db(this, n), `client.db("${n}")`));
      return this._dbs.get(n);
    }
    startSession(opts) {
      return strict(new ClientSession(Number(N.session("start", 0, JSON.stringify(toEJSON(opts || {}))))), "ClientSession");
    }
    async withSession(opts, fn) {
      if (typeof opts === "function") { fn = opts; opts = {}; }
      const s = this.startSession(opts);
      try { return await fn(s); } finally { await s.endSession(); }
    }
    // kiln owns the connection: a migration that closes "its" client must not close kiln's.
    async close() {}
    async connect() { return this; }
  }

  // A client built by a migration itself (`new MongoClient(url)`, `MongoClient.connect(url)`)
  // is refused: migrations get kiln's `db` and `client`.
  function refusedClient() {
    unsupported("new MongoClient(...) / MongoClient.connect(...) inside a migration (use the `db` and `client` arguments kiln passes to up/down)");
  }
  const PublicMongoClient = function MongoClient() { refusedClient(); };
  PublicMongoClient.connect = refusedClient;

  const mongodb = {
    ObjectId, ObjectID: ObjectId, Long, Decimal128, Int32, Double, Timestamp, Binary, UUID, MinKey, MaxKey, BSONRegExp, Code,
    MongoClient: PublicMongoClient, Db, Collection, ClientSession, FindCursor, AggregationCursor,
    MongoError, MongoServerError, MongoBulkWriteError, MongoInvalidArgumentError,
    ReadPreference: { PRIMARY: "primary", PRIMARY_PREFERRED: "primaryPreferred", SECONDARY: "secondary", SECONDARY_PREFERRED: "secondaryPreferred", NEAREST: "nearest" },
    ReturnDocument: { BEFORE: "before", AFTER: "after" },
    BSON: { ObjectId, Long, Decimal128, Int32, Double, Timestamp, Binary, UUID, MinKey, MaxKey, BSONRegExp, Code },
  };
  mongodb.default = mongodb;
  const bson = Object.assign({}, mongodb.BSON, { EJSON: { stringify: (v) => JSON.stringify(toEJSON(v)), parse: (s) => fromEJSON(JSON.parse(s)), serialize: toEJSON, deserialize: fromEJSON } });
  bson.default = bson;
  mongodb.BSON.EJSON = bson.EJSON;

  // --------------------------------------------------- console and process

  function show(v) {
    if (typeof v === "string") return v;
    if (v instanceof Error) return v.stack ? `${v.name}: ${v.message}\n${v.stack}` : `${v.name}: ${v.message}`;
    if (v instanceof ObjectId) return `new ObjectId("${v._hex}")`;
    if (v instanceof Date) return isNaN(v) ? "Invalid Date" : v.toISOString();
    if (typeof v === "object" && v !== null) {
      try {
        return JSON.stringify(v, (k, x) => (typeof x === "bigint" ? x.toString() : x));
      } catch (_) {
        return String(v);
      }
    }
    return String(v);
  }
  function format(args) {
    if (typeof args[0] === "string" && /%[sdifjoO%]/.test(args[0])) {
      let i = 1;
      const first = args[0].replace(/%([sdifjoO%])/g, (m, c) => {
        if (c === "%") return "%";
        if (i >= args.length) return m;
        const a = args[i++];
        if (c === "d" || c === "i") return String(parseInt(a, 10));
        if (c === "f") return String(parseFloat(a));
        return show(a);
      });
      return [first, ...args.slice(i).map(show)].join(" ");
    }
    return args.map(show).join(" ");
  }
  const timers = new Map();
  globalThis.console = {
    log: (...a) => N.log("info", format(a)),
    info: (...a) => N.log("info", format(a)),
    debug: (...a) => N.log("debug", format(a)),
    trace: (...a) => N.log("debug", format(a)),
    warn: (...a) => N.log("warn", format(a)),
    error: (...a) => N.log("error", format(a)),
    dir: (v) => N.log("info", show(v)),
    table: (v) => N.log("info", show(v)),
    time: (l) => timers.set(l || "default", Date.now()),
    timeEnd: (l) => { const t = timers.get(l || "default"); if (t !== undefined) N.log("info", `${l || "default"}: ${Date.now() - t}ms`); timers.delete(l || "default"); },
    timeLog: (l) => { const t = timers.get(l || "default"); if (t !== undefined) N.log("info", `${l || "default"}: ${Date.now() - t}ms`); },
    assert: (c, ...a) => { if (!c) N.log("error", "Assertion failed" + (a.length ? ": " + format(a) : "")); },
    group: () => {}, groupEnd: () => {}, count: () => {},
  };

  const env = JSON.parse(N.env());
  globalThis.process = {
    env,
    argv: ["node", "migrate-mongo"],
    platform: "linux",
    version: "v20.0.0",
    versions: { node: "20.0.0" },
    pid: 1,
    cwd: () => N.cwd(),
    exit: (code) => { throw new Error(`process.exit(${code === undefined ? "" : code}) called by a migration; kiln stopped it (the migration failed)`); },
    nextTick: (fn, ...args) => queueMicrotask(() => fn(...args)),
    hrtime: Object.assign((prev) => { const t = Date.now(); const s = [Math.floor(t / 1000), (t % 1000) * 1e6]; return prev ? [s[0] - prev[0], s[1] - prev[1]] : s; }, { bigint: () => BigInt(Date.now()) * 1000000n }),
    memoryUsage: () => ({ rss: 0, heapTotal: 0, heapUsed: 0, external: 0 }),
    on: () => globalThis.process, once: () => globalThis.process, emitWarning: (w) => N.log("warn", String(w)),
    stdout: { write: (s) => { N.log("info", String(s).replace(/\n$/, "")); return true; } },
    stderr: { write: (s) => { N.log("warn", String(s).replace(/\n$/, "")); return true; } },
  };
  globalThis.global = globalThis;

  // ----------------------------------------------------------------- timers

  const timerQueue = [];
  let timerSeq = 1;
  globalThis.setTimeout = (fn, ms, ...args) => {
    const id = timerSeq++;
    timerQueue.push({ id, at: Date.now() + Math.max(0, Number(ms) || 0), fn, args });
    timerQueue.sort((a, b) => a.at - b.at || a.id - b.id);
    return id;
  };
  globalThis.setImmediate = (fn, ...args) => globalThis.setTimeout(fn, 0, ...args);
  globalThis.clearTimeout = (id) => { const i = timerQueue.findIndex((t) => t.id === id); if (i >= 0) timerQueue.splice(i, 1); };
  globalThis.clearImmediate = globalThis.clearTimeout;
  globalThis.setInterval = (fn, ms) => unsupported(`setInterval(${ms})`);
  globalThis.clearInterval = () => {};
  if (typeof globalThis.queueMicrotask !== "function") globalThis.queueMicrotask = (fn) => Promise.resolve().then(fn);
  // Milliseconds until the next timer is due (-1: none).
  K.nextTimer = () => (timerQueue.length ? Math.max(0, timerQueue[0].at - Date.now()) : -1);
  K.fireTimer = () => { const t = timerQueue.shift(); if (t) t.fn(...t.args); };

  // ---------------------------------------------------------------- modules

  const cache = new Map();
  const BUILTIN = { mongodb, bson };
  // Node.js built-ins a migration may reach for: a small, honest subset.
  BUILTIN.util = {
    promisify: (fn) => (...args) => new Promise((res, rej) => fn(...args, (e, v) => (e ? rej(e) : res(v)))),
    format: (...a) => format(a),
    inspect: (v) => show(v),
    isDeepStrictEqual: (a, b) => JSON.stringify(toEJSON(a)) === JSON.stringify(toEJSON(b)),
    types: { isDate: (v) => v instanceof Date, isRegExp: (v) => v instanceof RegExp },
  };
  BUILTIN.assert = Object.assign(
    (c, m) => { if (!c) throw new Error(m || "assertion failed"); },
    {
      ok: (c, m) => { if (!c) throw new Error(m || "assertion failed"); },
      equal: (a, b, m) => { if (a != b) throw new Error(m || `${show(a)} == ${show(b)}`); },
      strictEqual: (a, b, m) => { if (a !== b) throw new Error(m || `${show(a)} === ${show(b)}`); },
      deepStrictEqual: (a, b, m) => { if (JSON.stringify(toEJSON(a)) !== JSON.stringify(toEJSON(b))) throw new Error(m || `${show(a)} deepStrictEqual ${show(b)}`); },
    }
  );
  BUILTIN.path = {
    sep: "/",
    join: (...p) => normalizePath(p.filter((x) => x !== "").join("/")),
    resolve: (...p) => { let r = N.cwd(); for (const x of p) r = x.startsWith("/") ? x : r + "/" + x; return normalizePath(r); },
    dirname: (p) => { const i = p.lastIndexOf("/"); return i <= 0 ? (i === 0 ? "/" : ".") : p.slice(0, i); },
    basename: (p, ext) => { let b = p.slice(p.lastIndexOf("/") + 1); if (ext && b.endsWith(ext)) b = b.slice(0, -ext.length); return b; },
    extname: (p) => { const b = p.slice(p.lastIndexOf("/") + 1); const i = b.lastIndexOf("."); return i <= 0 ? "" : b.slice(i); },
    isAbsolute: (p) => p.startsWith("/"),
  };
  BUILTIN.path.posix = BUILTIN.path;
  // dotenv: kiln reads `.env` itself; `config()` loads a file into process.env
  // without overriding what is set, as dotenv does.
  const dotenvParse = (path) => JSON.parse(N.dotenv(path || ""));
  BUILTIN.dotenv = {
    config(opts) {
      const parsed = dotenvParse(opts && opts.path);
      for (const k of Object.keys(parsed)) if (globalThis.process.env[k] === undefined || (opts && opts.override)) globalThis.process.env[k] = parsed[k];
      return { parsed };
    },
    parse(src) {
      const out = {};
      for (const line of String(src).split(/\r?\n/)) {
        const m = /^\s*(?:export\s+)?([\w.-]+)\s*=\s*(.*)?\s*$/.exec(line);
        if (!m) continue;
        let v = (m[2] || "").trim();
        if ((v.startsWith('"') && v.endsWith('"')) || (v.startsWith("'") && v.endsWith("'"))) v = v.slice(1, -1);
        out[m[1]] = v;
      }
      return out;
    },
  };
  BUILTIN.dotenv.default = BUILTIN.dotenv;
  Object.defineProperty(BUILTIN, "dotenv/config", { enumerable: true, get: () => { BUILTIN.dotenv.config(); return {}; } });
  for (const k of ["util", "assert", "path"]) BUILTIN["node:" + k] = BUILTIN[k];
  function normalizePath(p) {
    const abs = p.startsWith("/");
    const out = [];
    for (const s of p.split("/")) {
      if (s === "" || s === ".") continue;
      if (s === "..") out.pop();
      else out.push(s);
    }
    return (abs ? "/" : "") + out.join("/");
  }
  K.builtin = (name) => BUILTIN[name];
  K.builtinNames = () => Object.keys(BUILTIN);

  // CommonJS `require` for the module at `from`.
  function makeRequire(from) {
    const require = (spec) => {
      if (typeof spec !== "string") throw new TypeError("require() takes a module name");
      if (Object.prototype.hasOwnProperty.call(BUILTIN, spec)) return BUILTIN[spec];
      let resolved;
      try {
        resolved = N.resolve(from, spec);
      } catch (e) {
        const site = callerFrame();
        if (site && e.kilnFile === undefined) { e.kilnFile = site.file; e.kilnLine = site.line; }
        throw e;
      }
      return loadResolved(resolved);
    };
    require.resolve = (spec) => (BUILTIN[spec] ? spec : N.resolve(from, spec));
    require.cache = {};
    return require;
  }
  function loadResolved(path) {
    if (cache.has(path)) return cache.get(path).exports;
    if (path.endsWith(".json")) {
      const module = { exports: JSON.parse(N.source(path).code) };
      cache.set(path, module);
      return module.exports;
    }
    const src = N.source(path);
    if (src.kind === "esm") {
      const ns = N.importSync(path);
      cache.set(path, { exports: ns });
      return ns;
    }
    const module = { exports: {}, id: path, filename: path, loaded: false, children: [], paths: [] };
    cache.set(path, module);
    const dir = path.slice(0, path.lastIndexOf("/")) || "/";
    const fn = N.evalScript(path, src.code);
    fn.call(module.exports, module.exports, makeRequire(path), module, path, dir);
    module.loaded = true;
    return module.exports;
  }
  K.requireFile = (path) => loadResolved(path);
  K.require = (from, spec) => makeRequire(from)(spec);
  // Export names of a CommonJS module, for an ES module importing it.
  K.exportNames = (v) => (v && (typeof v === "object" || typeof v === "function") ? Object.keys(v).filter((k) => /^[A-Za-z_$][\w$]*$/.test(k) && k !== "default") : []);

  // ------------------------------------------------------------ migrations

  K.makeClient = (dbName) => {
    const client = strict(new MongoClient(dbName), "client");
    return { client, db: client.db(dbName) };
  };

  // migrate-mongo: `module.default ? module.default : module`.
  K.migrationOf = (exports) => (exports && exports.default ? exports.default : exports);

  // Run `fn` of a migration module; the outcome is kept in K.outcome.
  K.start = (mod, name, db, client) => {
    K.outcome = null;
    const m = K.migrationOf(mod);
    const fn = m && m[name];
    if (typeof fn !== "function") {
      K.outcome = { ok: false, error: { message: `the module exports no ${name}() function (migrate-mongo calls ${name}(db, client))`, missing: true } };
      return;
    }
    let p;
    try {
      // migrate-mongo before 7 passed a callback as the last argument.
      const params = /^[^(]*\(([^)]*)\)/.exec(String(fn));
      const last = params && params[1].split(",").map((s) => s.trim()).filter(Boolean).pop();
      if (fn.length >= 2 && ["next", "done", "callback", "cb"].includes(last) && fn.length < 3) {
        p = new Promise((res, rej) => fn.call(m, db, (e) => (e ? rej(e) : res())));
      } else {
        p = fn.call(m, db, client);
      }
    } catch (e) {
      K.outcome = { ok: false, error: describe(e) };
      return;
    }
    Promise.resolve(p).then(
      () => { K.outcome = { ok: true }; },
      (e) => { K.outcome = { ok: false, error: describe(e) }; }
    );
  };
  function describe(e) {
    if (e instanceof Error) {
      return {
        name: e.name, message: String(e.message), stack: String(e.stack || ""), code: e.code === undefined ? null : String(e.code), codeName: e.codeName || null,
        kilnFile: e.kilnFile === undefined ? null : e.kilnFile, kilnLine: e.kilnLine === undefined ? null : e.kilnLine,
      };
    }
    // QuickJS throws null when an allocation fails past the memory limit.
    if (e === null) return { name: "Error", message: "", stack: "", code: null, outOfMemory: true };
    return { name: "Error", message: `a non-Error value was thrown: ${show(e)}`, stack: "", code: null };
  }
  K.describe = describe;
  K.checkExports = (mod) => {
    const m = K.migrationOf(mod);
    return JSON.stringify({ up: !!m && typeof m.up === "function", down: !!m && typeof m.down === "function" });
  };
  // A config file's value, as JSON (it may be a promise: migrate-mongo awaits it).
  K.settle = (p) => {
    K.outcome = null;
    Promise.resolve(p).then((v) => { K.outcome = { ok: true, value: v }; }, (e) => { K.outcome = { ok: false, error: describe(e) }; });
  };
})();
