// Starts congodb (dist_ts/congodb of @push.rocks/smartmongo 2.2.0, unpacked
// by bed.py into node_modules/@push.rocks/smartmongo) on a loopback port.
//   node congodb-server.mjs --port P [--host 127.0.0.1]
// Prints "CONGODB_READY <host>:<port>" once listening; stops on SIGTERM/SIGINT.
import { CongoServer } from './node_modules/@push.rocks/smartmongo/dist_ts/congodb/index.js';

const args = process.argv.slice(2);
function opt(name, dflt) {
    const i = args.indexOf('--' + name);
    return i >= 0 && i + 1 < args.length ? args[i + 1] : dflt;
}
const host = opt('host', '127.0.0.1');
const port = Number(opt('port', '0'));
if (!port) {
    console.error('usage: congodb-server.mjs --port P [--host H]');
    process.exit(2);
}

const server = new CongoServer({ host, port, storage: 'memory' });
await server.start();
console.log(`CONGODB_READY ${host}:${port}`);

let stopping = false;
async function stop(sig) {
    if (stopping) return;
    stopping = true;
    try {
        await Promise.race([server.stop(), new Promise(r => setTimeout(r, 2000))]);
    } finally {
        process.exit(0);
    }
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
