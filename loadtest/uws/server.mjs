// The peer for loadtest/uws-bench.sh: uWebSockets.js's own pub/sub (topics
// in its C++ core), one Node process, with nchan's URL scheme so the load
// tester's `--target nchan` client drives it unchanged: a WebSocket to
// /sub/<channel> subscribes to the topic, a POST to /pub/<channel>
// publishes its body to every subscriber as a text message.
//
//   node loadtest/uws/server.mjs <port>
import uWS from 'uWebSockets.js';

const port = Number(process.argv[2] ?? 4780);
const app = uWS.App();

app.ws('/sub/*', {
  compression: uWS.DISABLED,
  maxPayloadLength: 64 * 1024,
  idleTimeout: 0,
  upgrade: (res, req, context) => {
    res.upgrade(
      { channel: req.getUrl().slice('/sub/'.length) },
      req.getHeader('sec-websocket-key'),
      req.getHeader('sec-websocket-protocol'),
      req.getHeader('sec-websocket-extensions'),
      context,
    );
  },
  open: (ws) => ws.subscribe(ws.getUserData().channel),
});

app.post('/pub/*', (res, req) => {
  const channel = req.getUrl().slice('/pub/'.length);
  const chunks = [];
  res.onAborted(() => {});
  res.onData((chunk, last) => {
    chunks.push(Buffer.from(chunk.slice(0)));
    if (!last) return;
    app.publish(channel, Buffer.concat(chunks), false);
    res.cork(() => res.writeStatus('200 OK').end('ok'));
  });
});

app.listen('127.0.0.1', port, (token) => {
  if (!token) {
    console.error(`uws could not listen on ${port}`);
    process.exit(1);
  }
  console.error(`uws ${port} ready`);
});
