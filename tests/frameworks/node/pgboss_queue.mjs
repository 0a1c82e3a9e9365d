// pg-boss as its users run it, with useListenNotify, for tests/test_frameworks.py: the same
// protocol as tests/frameworks/py_queues.py.
//
//   node pgboss_queue.mjs --dsn=DSN --workers=N --jobs=J --gap=S [--heartbeat-ms=MS]
//
// Starts N pg-boss instances (each its own pool and LISTEN connection) working one queue with
// polling at a minute, so only NOTIFY can wake them; prints {"ready": n} once they listen and
// have run a first job; after a line on stdin enqueues J jobs, one every S seconds, and prints
// {"latency": {job: [seconds from enqueue to each start]}}. Every 'error' and 'warning' pg-boss
// emits goes to stderr (the test fails on any of it). --heartbeat-ms: how often pg-boss checks
// its LISTEN with pg_listening_channels() (its default is 10 s).
import { createInterface } from 'node:readline'
import { parseArgs } from 'node:util'
import { PgBoss } from 'pg-boss'

const POLL_S = 60
const READY_TIMEOUT_MS = 60000
const LAST_JOB_GRACE_MS = 10000
const WARM_UP = -1
const QUEUE = 'work'

const { values: args } = parseArgs({
  options: {
    dsn: { type: 'string' },
    workers: { type: 'string', default: '1' },
    jobs: { type: 'string', default: '10' },
    gap: { type: 'string', default: '0.2' },
    'heartbeat-ms': { type: 'string', default: '10000' }
  }
})
const workers = Number(args.workers)
const jobs = Number(args.jobs)

const enqueued = new Map()
const starts = new Map()
let warmedUp
const warmUp = new Promise(resolve => { warmedUp = resolve })
let allStarted
const everyJob = new Promise(resolve => { allStarted = resolve })

function started (job) {
  if (job === WARM_UP) return warmedUp()
  const times = starts.get(job) ?? []
  times.push(performance.now())
  starts.set(job, times)
  if (starts.size === jobs) allStarted()
}

function report (what, instance) {
  return event => process.stderr.write(`pg-boss ${what} (instance ${instance}): ${event?.stack ?? JSON.stringify(event)}\n`)
}

function makeBoss (name) {
  const boss = new PgBoss({
    connectionString: args.dsn,
    useListenNotify: true,
    notifyHeartbeatIntervalMs: Number(args['heartbeat-ms'])
  })
  boss.on('error', report('error', name))
  boss.on('warning', report('warning', name))
  return boss
}

const within = (promise, ms) => Promise.race([promise, new Promise(resolve => setTimeout(resolve, ms))])

const producer = makeBoss('producer')
await producer.start()
await producer.createQueue(QUEUE, { notify: true })
const bosses = []
for (let i = 0; i < workers; i++) {
  const boss = makeBoss(i)
  await boss.start()
  await boss.work(QUEUE, { pollingIntervalSeconds: POLL_S }, async ([job]) => started(job.data.job))
  bosses.push(boss)
}
// Every worker listens once start() returned (a failed LISTEN is a warning, reported above).
await producer.send(QUEUE, { job: WARM_UP })
const warm = await within(warmUp.then(() => true), READY_TIMEOUT_MS)
console.log(JSON.stringify({ ready: warm ? bosses.length : 0 }))

const lines = createInterface({ input: process.stdin })
await new Promise(resolve => lines.once('line', resolve))
lines.close()
if (warm) {
  for (let job = 0; job < jobs; job++) {
    enqueued.set(job, performance.now())
    await producer.send(QUEUE, { job })
    await new Promise(resolve => setTimeout(resolve, Number(args.gap) * 1000)) // paces the producer
  }
  await within(everyJob, LAST_JOB_GRACE_MS)
}
for (const boss of [...bosses, producer]) await boss.stop({ graceful: true, wait: true })
const latency = {}
for (const [job, times] of starts) {
  latency[job] = times.map(t => Math.round(t - (enqueued.get(job) ?? t)) / 1000)
}
// Exit once said: a stopped pg-boss can leave a poll timer of a minute behind.
process.stdout.write(JSON.stringify({ latency }) + '\n', () => process.exit(0))
