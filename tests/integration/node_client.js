// An external client the project did not write: Node's @grpc/grpc-js against the gateway.
//
//   NODE_PATH=tools/node_modules node node_client.js ADDRESS TOKEN PROTOS_DIR QUERY_TEXT
//
// Performs a Query (prints `QUERY <entity count> <first trait type>`), then opens a WatchQuery on the
// same query and prints `WATCH <entity count>` for each result it receives. It exits 0 after the second
// watch result (the test writes an entity after the first), or 1 on any error (printed as `ERROR ...`).
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const loader = require('@grpc/proto-loader');

const [address, token, protosDir, text] = process.argv.slice(2);
const definition = loader.loadSync(path.join(protosDir, 'exocore/store/v1/entity_store.proto'), {
  includeDirs: [protosDir],
  keepCase: true,
  longs: String,
  defaults: true,
  oneofs: true,
});
const { EntityStore } = grpc.loadPackageDefinition(definition).exocore.store.v1;
const client = new EntityStore(address, grpc.credentials.createInsecure());
const metadata = new grpc.Metadata();
metadata.add('authorization', `Bearer ${token}`);
const query = { match: { query: text }, paging: { count: 100 } };

function fail(err) {
  console.log(`ERROR ${err.code} ${err.details || err.message}`);
  process.exit(1);
}

client.Query(query, metadata, { deadline: Date.now() + 5000 }, (err, results) => {
  if (err) fail(err);
  const first = results.entities.length ? results.entities[0].entity.traits[0].message.type_url : '-';
  console.log(`QUERY ${results.entities.length} ${first}`);
  const stream = client.WatchQuery(query, metadata);
  let received = 0;
  stream.on('data', (update) => {
    received += 1;
    console.log(`WATCH ${update.entities.length}`);
    if (received === 2) {
      stream.cancel();
      client.close();
      process.exit(0);
    }
  });
  stream.on('error', (e) => {
    if (e.code !== grpc.status.CANCELLED) fail(e);
  });
});

setTimeout(() => fail({ code: 'TIMEOUT', message: 'no second watch result within 30 s' }), 30000);
