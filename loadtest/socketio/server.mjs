// The peer for loadtest/peer-bench.sh socketio: the real Socket.IO 4.8 server
// (npm `socket.io`, its default `ws` engine, one Node process), written
// the way the event-signup app's server is: sockets join a channel's room
// with the `join` event (acked), and the backend's POST /api/v1/publish
// ({channel, event, payload}, the same body as fanout's server API) emits
// to the room; or a socket connects a room's own namespace and its emits
// reach the room's others.
//
//   node loadtest/socketio/server.mjs <port>
import { createServer } from 'node:http';
import { Server } from 'socket.io';

const port = Number(process.argv[2] ?? 4700);

const http = createServer((req, res) => {
  if (req.method !== 'POST' || req.url !== '/api/v1/publish') {
    res.writeHead(404).end();
    return;
  }
  let body = '';
  req.setEncoding('utf8');
  req.on('data', (d) => (body += d));
  req.on('end', () => {
    let m;
    try {
      m = JSON.parse(body);
    } catch {
      res.writeHead(400, { 'content-type': 'application/json' }).end('{"error":"invalid JSON"}');
      return;
    }
    io.to(m.channel).emit(m.event, m.payload);
    res.writeHead(200, { 'content-type': 'application/json' }).end('{"ok":true}');
  });
});

const io = new Server(http, { serveClient: false, transports: ['websocket'] });
io.on('connection', (socket) => {
  socket.on('join', (channel, ack) => {
    socket.join(channel);
    if (typeof ack === 'function') ack({ ok: true });
  });
  socket.on('leave', (channel, ack) => {
    socket.leave(channel);
    if (typeof ack === 'function') ack({ ok: true });
  });
});

// A namespace per room, as a Socket.IO room app has it: a socket that
// connects `/workshop:3` is in that workshop, and each of its emits reaches
// the namespace's other sockets (what the workshop scenario drives).
io.of(/^\/.+$/).on('connection', (socket) => {
  socket.onAny((event, payload) => socket.broadcast.emit(event, payload));
});

http.listen(port, '127.0.0.1', () => console.error(`socket.io ${port} ready`));
