// A plain Node.js HTTP server, the kind that runs under systemd socket
// activation: it serves on the listening socket it inherits at fd 3
// (LISTEN_FDS/LISTEN_PID) and drains on SIGTERM. Nothing in it knows fugue;
// FUGUE_WORKER_ID/FUGUE_GENERATION only decorate the greeting.
'use strict';
const http = require('http');
const net = require('net');

const VERSION = 'v1';

if (process.env.LISTEN_PID !== String(process.pid) || !(parseInt(process.env.LISTEN_FDS, 10) >= 1)) {
  console.error('node_server: not socket-activated (LISTEN_FDS/LISTEN_PID)');
  process.exit(1);
}

let draining = false;
const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://localhost');
  const body = `hello from worker ${process.env.FUGUE_WORKER_ID} pid ${process.pid} ` +
    `generation ${process.env.FUGUE_GENERATION} version ${VERSION} node\n`;
  const answer = () => {
    res.setHeader('Content-Type', 'text/plain');
    res.setHeader('Content-Length', Buffer.byteLength(body));
    if (draining) res.setHeader('Connection', 'close');
    res.end(body);
  };
  if (url.pathname === '/slow') setTimeout(answer, 1000 * parseFloat(url.searchParams.get('s') || '1'));
  else answer();
});

server.listen({ fd: 3 }, () => console.log(`node_server ${process.pid} ${VERSION} serving on fd 3`));

process.on('SIGTERM', () => {
  draining = true;
  // Stop accepting, and let the connections end: requests in flight finish, the
  // next request on an idle keep-alive connection gets Connection: close. This
  // is net.Server's close, not http.Server's, which (Node >= 19) also closes
  // idle keep-alive connections under clients that may be reusing them.
  net.Server.prototype.close.call(server, () => process.exit(0));
});
