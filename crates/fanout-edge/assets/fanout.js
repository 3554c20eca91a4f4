/**
 * fanout.js: the fanout project's own small browser client.
 *
 * It speaks the Supabase Realtime wire protocol (Phoenix Channels, vsn 2.0.0)
 * directly over the browser `WebSocket`, with no dependencies and no build
 * step. It covers what the demo page needs and what fanout adds on top:
 *
 * - one socket per client, with a heartbeat every 25 s and automatic
 *   reconnection (exponential backoff 1 s, 2 s, 4 s … capped at 30 s, ±20 %
 *   jitter, reset once a connection opens);
 * - channels (`realtime:<name>`) that rejoin by themselves after a reconnect
 *   and ask the server to replay what they missed (`config.resume.after`, the
 *   last broadcast position seen on that channel);
 * - broadcast send (text frames) and receive (text frames or binary kind 4);
 * - Phoenix Presence with the usual sync semantics, re-tracked after a rejoin.
 *
 * It deliberately does not do postgres_changes bindings, REST fallbacks,
 * vsn 1.0.0 or message buffering while offline: `send()` tells you whether the
 * message went out instead.
 *
 * @example
 * import { FanoutClient } from '/fanout.js';
 * const client = new FanoutClient();            // ws(s)://<this host>/realtime/v1/websocket
 * client.onStatus((status) => console.log(status)); // 'connecting' | 'live' | 'offline'
 * const ch = client.channel('workshop:demo', { presenceKey: 'u1', self: true });
 * ch.on('broadcast', 'chat', ({ payload, meta }) => console.log(payload, meta.id));
 * ch.onPresence('sync', () => console.log(ch.presence()));
 * ch.subscribe((status) => { if (status === 'SUBSCRIBED') ch.track({ name: 'Alice' }); });
 * ch.send('chat', { text: 'hello' });
 *
 * @module fanout
 */

const VSN = '2.0.0';
/** Binary frame kinds of the vsn 2.0.0 serializer. */
const KIND_PUSH = 0;
const KIND_REPLY = 1;
const KIND_BROADCAST = 2;
const KIND_USER_BROADCAST = 4;

const textDecoder = new TextDecoder();

/**
 * @typedef {'connecting' | 'live' | 'offline'} ConnectionStatus
 *
 * @typedef {object} StatusInfo
 * @property {number} [code]        WebSocket close code (offline only).
 * @property {string} [reason]      Why the socket closed (offline only).
 * @property {number} [retryInMs]   Delay before the next attempt (offline only).
 * @property {number} [attempt]     Number of failed attempts in a row.
 * @property {boolean} [manual]     True after `disconnect()`: no retry is scheduled.
 *
 * @typedef {'SUBSCRIBED' | 'CHANNEL_ERROR' | 'TIMED_OUT' | 'CLOSED'} ChannelStatus
 *
 * @typedef {object} Reply
 * @property {'ok' | 'error' | 'timeout' | 'disconnected'} status
 * @property {any} [response]
 *
 * @typedef {object} BroadcastMessage
 * @property {'broadcast'} type
 * @property {string} event          The user event name, e.g. 'chat'.
 * @property {any} payload           The user payload.
 * @property {{id?: string, replayed?: boolean} | undefined} meta
 *           `id` is the message's position in its channel; `replayed` is true
 *           for messages the server replays after a resume.
 */

/**
 * One WebSocket connection to fanout, shared by any number of channels.
 */
export class FanoutClient {
  /**
   * @param {object} [options]
   * @param {string} [options.url] WebSocket endpoint (`ws:`, `wss:`, `http:`,
   *   `https:` or a path); default `ws(s)://<location.host>/realtime/v1/websocket`.
   *   A URL ending in `/realtime/v1` gets `/websocket` appended.
   * @param {string} [options.apikey] JWT sent as `apikey` on connect and as
   *   `access_token` in each join.
   * @param {number} [options.heartbeatIntervalMs=25000]
   * @param {number} [options.timeoutMs=10000] How long to wait for a reply
   *   (join, track) and for a socket to open.
   * @param {number} [options.reconnectBaseMs=1000] First reconnect delay.
   * @param {number} [options.reconnectMaxMs=30000] Cap of the reconnect delay.
   * @param {number} [options.jitter=0.2] Random spread of each delay (±20 %).
   * @param {(kind: string, msg: string, data?: any) => void} [options.logger]
   */
  constructor(options = {}) {
    this.url = resolveEndpoint(options.url);
    this.apikey = options.apikey || null;
    this.heartbeatIntervalMs = options.heartbeatIntervalMs ?? 25000;
    this.timeoutMs = options.timeoutMs ?? 10000;
    this.reconnectBaseMs = options.reconnectBaseMs ?? 1000;
    this.reconnectMaxMs = options.reconnectMaxMs ?? 30000;
    this.jitter = options.jitter ?? 0.2;
    this.logger = options.logger || null;

    /** @type {ConnectionStatus} */
    this.status = 'offline';
    /** @type {WebSocket | null} */
    this._ws = null;
    this._ref = 0;
    /** @type {Map<string, FanoutChannel>} topic → channel */
    this._channels = new Map();
    /** @type {Map<string, {resolve: (r: Reply) => void, timer: any}>} ref → pending reply */
    this._pending = new Map();
    this._statusCbs = new Set();
    this._attempts = 0;
    this._reconnectTimer = null;
    this._openTimer = null;
    this._heartbeatTimer = null;
    this._heartbeatRef = null;
    this._manualClose = true; // nothing to keep alive until connect() is called

    if (typeof window !== 'undefined' && window.addEventListener) {
      // The network came back: no need to wait for the backoff timer.
      window.addEventListener('online', () => {
        if (this.status === 'offline' && !this._manualClose) this.reconnectNow();
      });
    }
  }

  /**
   * Registers a connection status callback. It is called right away with the
   * current status, then on every change.
   * @param {(status: ConnectionStatus, info: StatusInfo) => void} cb
   * @returns {() => void} unsubscribe
   */
  onStatus(cb) {
    this._statusCbs.add(cb);
    safeCall(cb, this.status, {});
    return () => this._statusCbs.delete(cb);
  }

  /** True when the socket is open. */
  get isLive() {
    return this.status === 'live';
  }

  /**
   * Opens the socket (if it is not open or opening already). Called by
   * `channel.subscribe()`, so you rarely need it yourself.
   */
  connect() {
    this._manualClose = false;
    if (this._ws) return;
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    this._setStatus('connecting', { attempt: this._attempts });
    let ws;
    try {
      ws = new WebSocket(this._endpoint());
    } catch (err) {
      this._log('error', 'cannot create WebSocket', err);
      this._scheduleReconnect({ code: 0, reason: String(err) });
      return;
    }
    ws.binaryType = 'arraybuffer';
    ws.onopen = () => this._onOpen(ws);
    ws.onmessage = (ev) => this._onMessage(ws, ev);
    ws.onclose = (ev) => this._onClose(ws, ev.code, ev.reason || (ev.wasClean ? 'closed' : 'connection lost'));
    ws.onerror = () => {}; // a close event always follows
    this._ws = ws;
    // A socket that neither opens nor fails (e.g. lost SYN) would hang forever.
    this._openTimer = setTimeout(() => {
      if (this._ws === ws && ws.readyState === WebSocket.CONNECTING) this._dropSocket('connect timeout');
    }, this.timeoutMs);
  }

  /**
   * Retries now instead of waiting for the backoff timer (also after
   * `disconnect()`). Does nothing while connecting or live.
   */
  reconnectNow() {
    this._manualClose = false;
    if (this._ws) return;
    this._attempts = 0;
    this.connect();
  }

  /** Closes the socket and stops reconnecting. Channels stay registered. */
  disconnect() {
    this._manualClose = true;
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    if (this._ws) this._dropSocket('disconnect', 1000);
    else this._setStatus('offline', { manual: true });
  }

  /**
   * Returns the channel for `name` (topic `realtime:<name>`), creating it if
   * needed. Options only apply when it is created.
   * @param {string} name e.g. 'workshop:demo'
   * @param {object} [opts]
   * @param {string} [opts.presenceKey=''] Presence key (empty: the server makes one).
   * @param {boolean} [opts.self=false] Receive your own broadcasts.
   * @returns {FanoutChannel}
   */
  channel(name, opts = {}) {
    const topic = name.startsWith('realtime:') ? name : `realtime:${name}`;
    let ch = this._channels.get(topic);
    if (!ch) {
      ch = new FanoutChannel(this, topic, opts);
      this._channels.set(topic, ch);
    }
    return ch;
  }

  // ---- internals -------------------------------------------------------

  _endpoint() {
    const u = new URL(this.url);
    u.searchParams.set('vsn', VSN);
    if (this.apikey) u.searchParams.set('apikey', this.apikey);
    return u.toString();
  }

  _makeRef() {
    this._ref += 1;
    return String(this._ref);
  }

  _log(kind, msg, data) {
    if (this.logger) safeCall(this.logger, kind, msg, data);
  }

  _setStatus(status, info = {}) {
    this.status = status;
    this._log('status', status, info);
    for (const cb of [...this._statusCbs]) safeCall(cb, status, info);
  }

  /**
   * Sends one vsn 2.0.0 text frame. With `expectReply`, resolves with the
   * matching `phx_reply` (or 'timeout' / 'disconnected').
   * @returns {Promise<Reply> | boolean}
   */
  _push(joinRef, topic, event, payload, { expectReply = false, ref = this._makeRef() } = {}) {
    const ws = this._ws;
    const open = ws && ws.readyState === WebSocket.OPEN;
    if (open) {
      try {
        ws.send(JSON.stringify([joinRef, ref, topic, event, payload]));
      } catch (err) {
        this._log('error', 'send failed', err);
        return expectReply ? Promise.resolve({ status: 'disconnected' }) : false;
      }
    }
    if (!expectReply) return !!open;
    if (!open) return Promise.resolve({ status: 'disconnected' });
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this._pending.delete(ref);
        resolve({ status: 'timeout' });
      }, this.timeoutMs);
      this._pending.set(ref, { resolve, timer });
    });
  }

  _onOpen(ws) {
    if (ws !== this._ws) return;
    clearTimeout(this._openTimer);
    this._attempts = 0;
    this._setStatus('live', {});
    this._heartbeatRef = null;
    clearInterval(this._heartbeatTimer);
    this._heartbeatTimer = setInterval(() => this._heartbeat(), this.heartbeatIntervalMs);
    for (const ch of this._channels.values()) ch._onSocketOpen();
  }

  _heartbeat() {
    if (!this._ws || this._ws.readyState !== WebSocket.OPEN) return;
    if (this._heartbeatRef) {
      // The previous heartbeat got no reply within a whole interval.
      this._log('error', 'heartbeat timeout');
      this._dropSocket('heartbeat timeout');
      return;
    }
    this._heartbeatRef = this._makeRef();
    this._push(null, 'phoenix', 'heartbeat', {}, { ref: this._heartbeatRef });
  }

  _onMessage(ws, ev) {
    if (ws !== this._ws) return;
    let msg;
    try {
      msg = typeof ev.data === 'string' ? decodeText(ev.data) : decodeBinary(ev.data);
    } catch (err) {
      this._log('error', 'undecodable frame', err);
      return;
    }
    if (!msg) return;
    this._log('recv', msg.event, msg);
    if (msg.event === 'phx_reply' && msg.ref != null) {
      const ref = String(msg.ref);
      if (msg.topic === 'phoenix' && ref === this._heartbeatRef) {
        this._heartbeatRef = null;
        return;
      }
      const pending = this._pending.get(ref);
      if (pending) {
        this._pending.delete(ref);
        clearTimeout(pending.timer);
        const p = msg.payload || {};
        pending.resolve({ status: p.status, response: p.response });
        return;
      }
    }
    const ch = this._channels.get(msg.topic);
    if (ch) ch._onMessage(msg);
  }

  /** Closes the current socket right away, without waiting for a close handshake. */
  _dropSocket(reason, code = 4000) {
    const ws = this._ws;
    if (!ws) return;
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    try {
      ws.close(code, reason);
    } catch {
      /* already closed */
    }
    this._onClose(ws, code, reason);
  }

  _onClose(ws, code, reason) {
    if (ws !== this._ws) return;
    this._ws = null;
    clearTimeout(this._openTimer);
    clearInterval(this._heartbeatTimer);
    this._heartbeatTimer = null;
    this._heartbeatRef = null;
    for (const [ref, p] of this._pending) {
      clearTimeout(p.timer);
      p.resolve({ status: 'disconnected' });
      this._pending.delete(ref);
    }
    this.status = 'offline'; // channels see isLive === false; listeners are told below
    for (const ch of this._channels.values()) ch._onSocketClose();
    if (this._manualClose) this._setStatus('offline', { code, reason, manual: true });
    else this._scheduleReconnect({ code, reason });
  }

  /** Delay before attempt n (0-based): base·2ⁿ ± jitter, never above the cap. */
  _backoff(n) {
    const raw = Math.min(this.reconnectMaxMs, this.reconnectBaseMs * 2 ** Math.min(n, 20));
    const spread = raw * this.jitter * (Math.random() * 2 - 1);
    return Math.round(Math.min(this.reconnectMaxMs, Math.max(0, raw + spread)));
  }

  _scheduleReconnect(info) {
    const delay = this._backoff(this._attempts);
    this._attempts += 1;
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = setTimeout(() => {
      this._reconnectTimer = null;
      this.connect();
    }, delay);
    this._setStatus('offline', { ...info, retryInMs: delay, attempt: this._attempts });
  }
}

/** Rejoin delays of a channel whose join failed while the socket is fine. */
const REJOIN_DELAYS_MS = [1000, 2000, 5000, 10000];

/**
 * One Phoenix channel (topic `realtime:<name>`) on a {@link FanoutClient}.
 * Create it with `client.channel(name, opts)`.
 */
export class FanoutChannel {
  /** @param {FanoutClient} client @param {string} topic */
  constructor(client, topic, opts = {}) {
    this.client = client;
    this.topic = topic;
    this.presenceKey = opts.presenceKey ?? '';
    this.self = !!opts.self;
    /** @type {'closed' | 'joining' | 'joined' | 'errored' | 'leaving'} */
    this.state = 'closed';
    /** Position (`meta.id`) of the last broadcast seen; sent as `resume.after` on rejoin. */
    this.lastId = null;
    this._joinRef = null;
    this._wanted = false; // the user wants this channel joined
    this._rejoinAttempts = 0;
    this._rejoinTimer = null;
    this._statusCb = null;
    /** @type {Array<{type: string, filter: string, cb: Function}>} */
    this._handlers = [];
    this._tracked = null; // meta object to (re-)track after each join

    // Presence: key → {metas: [...]}, Phoenix style.
    this._presence = {};
    this._presenceSynced = false; // a presence_state arrived for the current join
    this._pendingDiffs = [];
    this._presenceCbs = { sync: new Set(), join: new Set(), leave: new Set() };
  }

  /**
   * Listens for messages.
   * - `on('broadcast', event, cb)`: broadcasts of user event `event` (`'*'` for
   *   all); `cb(message: BroadcastMessage)`.
   * - `on('system', cb)`: every `system` message; `cb(payload)`.
   * - `on('resync', cb)`: the server could not replay from our position (it is
   *   past its retention); `cb(systemPayload)`. Reload your state.
   * - `on('<event>', cb)`: any other server event on this topic; `cb(payload)`.
   * @returns {() => void} remove the handler
   */
  on(type, filterOrCb, maybeCb) {
    const cb = typeof filterOrCb === 'function' ? filterOrCb : maybeCb;
    const filter = typeof filterOrCb === 'function' ? '*' : filterOrCb;
    const h = { type, filter, cb };
    this._handlers.push(h);
    return () => {
      this._handlers = this._handlers.filter((x) => x !== h);
    };
  }

  /**
   * Presence callbacks:
   * - `'sync'`: `cb()` after the presence list changed (state or diff applied);
   * - `'join'`: `cb(key, currentMetas | undefined, joinedMetas)`; `currentMetas`
   *   is undefined when the key was not present before;
   * - `'leave'`: `cb(key, remainingMetas, leftMetas)`; `remainingMetas` is
   *   empty when the key is gone.
   * @param {'sync' | 'join' | 'leave'} event
   * @returns {() => void} remove the callback
   */
  onPresence(event, cb) {
    const set = this._presenceCbs[event];
    if (!set) throw new Error(`unknown presence event: ${event}`);
    set.add(cb);
    return () => set.delete(cb);
  }

  /**
   * The presence list: `{key: metas[]}` (a copy). Each meta has `phx_ref`
   * plus what the peer tracked.
   * @returns {Record<string, object[]>}
   */
  presence() {
    const out = {};
    for (const [key, { metas }] of Object.entries(this._presence)) out[key] = metas.map((m) => ({ ...m }));
    return out;
  }

  /**
   * Joins the channel (connecting the client if needed). The channel rejoins
   * by itself after reconnects and server errors until `unsubscribe()`.
   * @param {(status: ChannelStatus, err?: Error) => void} [statusCb] called on
   *   each (re)join result and on errors.
   * @returns {this}
   */
  subscribe(statusCb) {
    if (statusCb) this._statusCb = statusCb;
    this._wanted = true;
    if (this.client.isLive) this._join();
    else this.client.connect();
    return this;
  }

  /**
   * Leaves the channel (`phx_leave`) and stops rejoining.
   * @returns {Promise<Reply>}
   */
  async unsubscribe() {
    this._wanted = false;
    clearTimeout(this._rejoinTimer);
    const joinRef = this._joinRef;
    this.state = 'leaving';
    const reply = await this.client._push(joinRef, this.topic, 'phx_leave', {}, { expectReply: true });
    this._closed();
    return reply;
  }

  /**
   * Broadcasts `payload` as user event `event` to everyone on the channel
   * (and to yourself with `self: true`).
   * @returns {boolean} true if it was written to a live socket on a joined
   *   channel; false when offline or not joined (nothing is queued).
   */
  send(event, payload) {
    if (this.state !== 'joined') return false;
    return /** @type {boolean} */ (
      this.client._push(this._joinRef, this.topic, 'broadcast', { type: 'broadcast', event, payload })
    );
  }

  /**
   * Tracks this client's presence with `meta` (replacing what was tracked).
   * Remembered and re-tracked after each rejoin.
   * @param {object} meta
   * @returns {Promise<Reply | {status: 'queued'}>} 'queued' when not joined yet
   */
  async track(meta) {
    this._tracked = { ...meta };
    if (this.state !== 'joined') return { status: 'queued' };
    return this._pushPresence('track', this._tracked);
  }

  /**
   * Stops tracking this client's presence.
   * @returns {Promise<Reply | {status: 'queued'}>}
   */
  async untrack() {
    this._tracked = null;
    if (this.state !== 'joined') return { status: 'queued' };
    return this._pushPresence('untrack', undefined);
  }

  // ---- internals -------------------------------------------------------

  _pushPresence(event, payload) {
    const body = { type: 'presence', event };
    if (payload !== undefined) body.payload = payload;
    return this.client._push(this._joinRef, this.topic, 'presence', body, { expectReply: true });
  }

  _emitStatus(status, err) {
    if (this._statusCb) safeCall(this._statusCb, status, err);
  }

  _dispatch(type, filter, arg) {
    for (const h of [...this._handlers]) {
      if (h.type === type && (h.filter === '*' || h.filter === filter)) safeCall(h.cb, arg);
    }
  }

  _join() {
    clearTimeout(this._rejoinTimer);
    this._rejoinTimer = null;
    const joinRef = this.client._makeRef();
    this._joinRef = joinRef;
    this.state = 'joining';
    this._presenceSynced = false;
    this._pendingDiffs = [];
    const config = {
      broadcast: { self: this.self, ack: false },
      presence: { key: this.presenceKey, enabled: true },
      postgres_changes: [],
      private: false,
    };
    // Ask the server to replay what we missed while we were away.
    if (this.lastId != null) config.resume = { after: this.lastId };
    const payload = { config };
    if (this.client.apikey) payload.access_token = this.client.apikey;
    const reply = this.client._push(joinRef, this.topic, 'phx_join', payload, { expectReply: true, ref: joinRef });
    reply.then((r) => this._onJoinReply(joinRef, r));
  }

  _onJoinReply(joinRef, reply) {
    if (joinRef !== this._joinRef || this.state !== 'joining') return;
    if (reply.status === 'ok') {
      this.state = 'joined';
      this._rejoinAttempts = 0;
      this._emitStatus('SUBSCRIBED');
      if (this._tracked) this._pushPresence('track', this._tracked);
    } else if (reply.status === 'disconnected') {
      // The socket closed; _onSocketClose already handled it.
    } else {
      this.state = 'errored';
      const reason = reply.status === 'timeout' ? 'join timed out' : reply.response?.reason || 'join refused';
      this._emitStatus(reply.status === 'timeout' ? 'TIMED_OUT' : 'CHANNEL_ERROR', new Error(reason));
      if (reply.status === 'timeout') this.client._push(joinRef, this.topic, 'phx_leave', {});
      this._scheduleRejoin();
    }
  }

  _scheduleRejoin() {
    if (!this._wanted || !this.client.isLive) return;
    const delay = REJOIN_DELAYS_MS[Math.min(this._rejoinAttempts, REJOIN_DELAYS_MS.length - 1)];
    this._rejoinAttempts += 1;
    clearTimeout(this._rejoinTimer);
    this._rejoinTimer = setTimeout(() => {
      if (this._wanted && this.client.isLive && this.state !== 'joined' && this.state !== 'joining') this._join();
    }, delay);
  }

  _onSocketOpen() {
    if (this._wanted) {
      this._rejoinAttempts = 0;
      this._join();
    }
  }

  _onSocketClose() {
    clearTimeout(this._rejoinTimer);
    if (this.state === 'joined' || this.state === 'joining') {
      this.state = 'errored';
      this._emitStatus('CHANNEL_ERROR', new Error('connection lost; will rejoin'));
    } else if (this.state === 'leaving') {
      this._closed();
    }
  }

  _closed() {
    this.state = 'closed';
    this._joinRef = null;
    this._emitStatus('CLOSED');
  }

  _onMessage(msg) {
    const { event, payload } = msg;
    // Replies and pushes tied to an older join of this topic are stale.
    if (msg.join_ref != null && this._joinRef != null && String(msg.join_ref) !== this._joinRef) return;
    switch (event) {
      case 'broadcast': {
        const meta = payload?.meta;
        if (meta && meta.id != null) this.lastId = String(meta.id);
        this._dispatch('broadcast', payload?.event, payload);
        break;
      }
      case 'presence_state':
        this._onPresenceState(payload || {});
        break;
      case 'presence_diff':
        if (this._presenceSynced) this._applyDiff(payload || {});
        else this._pendingDiffs.push(payload || {});
        break;
      case 'phx_error':
        if (this.state === 'joined' || this.state === 'joining') {
          this.state = 'errored';
          this._emitStatus('CHANNEL_ERROR', new Error('channel crashed on the server; rejoining'));
          this._scheduleRejoin();
        }
        break;
      case 'phx_close':
        if (this.state !== 'closed') {
          this._wanted = false;
          clearTimeout(this._rejoinTimer);
          this._closed();
        }
        break;
      case 'system':
        this._dispatch('system', '*', payload);
        if (payload?.status === 'error' && /resync/i.test(String(payload.message ?? ''))) {
          this._dispatch('resync', '*', payload);
        }
        break;
      case 'phx_reply':
        break; // a reply nobody waits for any more
      default:
        this._dispatch(event, '*', payload);
    }
  }

  // ---- presence (Phoenix Presence semantics) ---------------------------

  _emitPresence(event, ...args) {
    for (const cb of [...this._presenceCbs[event]]) safeCall(cb, ...args);
  }

  /** A full state replaces ours; joins and leaves are the difference. */
  _onPresenceState(newState) {
    const oldState = this._presence;
    const joins = {};
    const leaves = {};
    for (const [key, pres] of Object.entries(oldState)) {
      if (!(key in newState)) leaves[key] = pres;
    }
    for (const [key, pres] of Object.entries(newState)) {
      const cur = oldState[key];
      if (!cur) {
        joins[key] = pres;
        continue;
      }
      const newRefs = new Set((pres.metas || []).map((m) => m.phx_ref));
      const curRefs = new Set(cur.metas.map((m) => m.phx_ref));
      const joined = (pres.metas || []).filter((m) => !curRefs.has(m.phx_ref));
      const left = cur.metas.filter((m) => !newRefs.has(m.phx_ref));
      if (joined.length) joins[key] = { metas: joined };
      if (left.length) leaves[key] = { metas: left };
    }
    this._presence = clonePresence(newState);
    this._presenceSynced = true;
    this._notifyDiff(oldState, joins, leaves);
    const pending = this._pendingDiffs;
    this._pendingDiffs = [];
    for (const diff of pending) this._applyDiff(diff, false);
    this._emitPresence('sync');
  }

  /** Applies one presence_diff: joins first, then leaves (a meta update is both). */
  _applyDiff({ joins = {}, leaves = {} }, sync = true) {
    const state = this._presence;
    for (const [key, pres] of Object.entries(joins)) {
      const cur = state[key];
      const metas = (pres.metas || []).map((m) => ({ ...m }));
      if (cur) {
        const joinedRefs = new Set(metas.map((m) => m.phx_ref));
        metas.unshift(...cur.metas.filter((m) => !joinedRefs.has(m.phx_ref)));
      }
      state[key] = { metas };
      this._emitPresence('join', key, cur ? cur.metas.map((m) => ({ ...m })) : undefined, pres.metas);
    }
    for (const [key, pres] of Object.entries(leaves)) {
      const cur = state[key];
      if (!cur) continue;
      const gone = new Set((pres.metas || []).map((m) => m.phx_ref));
      cur.metas = cur.metas.filter((m) => !gone.has(m.phx_ref));
      this._emitPresence('leave', key, cur.metas.map((m) => ({ ...m })), pres.metas);
      if (cur.metas.length === 0) delete state[key];
    }
    if (sync) this._emitPresence('sync');
  }

  /** Join/leave callbacks for a state replacement (old state = before it). */
  _notifyDiff(oldState, joins, leaves) {
    for (const [key, pres] of Object.entries(joins)) {
      const cur = oldState[key];
      this._emitPresence('join', key, cur ? cur.metas.map((m) => ({ ...m })) : undefined, pres.metas);
    }
    for (const [key, pres] of Object.entries(leaves)) {
      const remaining = this._presence[key]?.metas ?? [];
      this._emitPresence('leave', key, remaining.map((m) => ({ ...m })), pres.metas);
    }
  }
}

// ---- codecs --------------------------------------------------------------

/** Decodes a vsn 2.0.0 text frame `[join_ref, ref, topic, event, payload]`. */
function decodeText(text) {
  const arr = JSON.parse(text);
  if (!Array.isArray(arr) || arr.length < 5) return null;
  const [join_ref, ref, topic, event, payload] = arr;
  return { join_ref, ref, topic, event, payload };
}

/**
 * Decodes a vsn 2.0.0 binary frame. Kind 4 (user broadcast) is what fanout
 * sends for broadcasts:
 * `u8 4, u8 topic_len, u8 event_len, u8 meta_len, u8 encoding (0 raw, 1 JSON)`,
 * then topic, user event, metadata JSON (may be empty) and the payload.
 * Kinds 0 (push), 1 (reply) and 2 (broadcast) carry raw binary payloads.
 */
function decodeBinary(buf) {
  const bytes = new Uint8Array(buf);
  const kind = bytes[0];
  let pos;
  const str = (len) => {
    const s = textDecoder.decode(bytes.subarray(pos, pos + len));
    pos += len;
    return s;
  };
  const rest = () => buf.slice(pos);
  switch (kind) {
    case KIND_USER_BROADCAST: {
      const [topicLen, eventLen, metaLen, encoding] = [bytes[1], bytes[2], bytes[3], bytes[4]];
      pos = 5;
      const topic = str(topicLen);
      const userEvent = str(eventLen);
      const metaText = str(metaLen);
      const data = encoding === 1 ? JSON.parse(textDecoder.decode(bytes.subarray(pos))) : rest();
      const payload = { type: 'broadcast', event: userEvent, payload: data, meta: metaText ? JSON.parse(metaText) : undefined };
      return { join_ref: null, ref: null, topic, event: 'broadcast', payload };
    }
    case KIND_PUSH: {
      pos = 4;
      const join_ref = str(bytes[1]);
      const topic = str(bytes[2]);
      const event = str(bytes[3]);
      return { join_ref, ref: null, topic, event, payload: rest() };
    }
    case KIND_REPLY: {
      pos = 5;
      const join_ref = str(bytes[1]);
      const ref = str(bytes[2]);
      const topic = str(bytes[3]);
      const status = str(bytes[4]);
      return { join_ref, ref, topic, event: 'phx_reply', payload: { status, response: rest() } };
    }
    case KIND_BROADCAST: {
      pos = 3;
      const topic = str(bytes[1]);
      const event = str(bytes[2]);
      return { join_ref: null, ref: null, topic, event, payload: rest() };
    }
    default:
      throw new Error(`unknown binary frame kind ${kind}`);
  }
}

// ---- helpers -------------------------------------------------------------

/** Turns the `url` option (or the page location) into a ws(s) endpoint. */
function resolveEndpoint(url) {
  const base = typeof location !== 'undefined' ? location.href : 'http://localhost/';
  const u = new URL(url || '/realtime/v1/websocket', base);
  if (u.protocol === 'http:') u.protocol = 'ws:';
  else if (u.protocol === 'https:') u.protocol = 'wss:';
  if (/\/realtime\/v1\/?$/.test(u.pathname)) u.pathname = u.pathname.replace(/\/?$/, '/websocket');
  return u.toString();
}

function clonePresence(state) {
  const out = {};
  for (const [key, pres] of Object.entries(state)) out[key] = { metas: (pres.metas || []).map((m) => ({ ...m })) };
  return out;
}

/** Calls a user callback; its exceptions must not break the client. */
function safeCall(fn, ...args) {
  try {
    fn(...args);
  } catch (err) {
    console.error('fanout.js: callback failed', err);
  }
}
