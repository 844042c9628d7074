// Command seedpool is the seed's global keyed worker pool, rebuilt from its
// design (../shared/seed/global-keyed-pool-migration.md) in plain Go, so the
// pool bench (benches/pool.rs) can run the real thing side by side with ours.
//
// The pool: a fixed set of workers (256), each a goroutine reading one
// bounded channel (1,000 deep); a message goes to worker
// fnv32a(AggregateID) mod 256; ProcessMessage tries a non-blocking send, then
// waits up to WaitTimeout (500 ms) for room and fails with
// errWorkerQueueFull, which the caller retries. The worker runs the handler
// the message carries and reports its result on the message's Done channel
// without blocking.
//
// Modes:
//
//	-mode flood       one producer submits every event as fast as the pool accepts
//	-mode partitions  the events are spread over -partitions readers by key hash
//	                  (fnv32a mod partitions); with -wait (the seed's ConsumeClaim)
//	                  each reader waits for a message's Done before the next
//
// It prints one JSON line: events, wall and CPU time (getrusage, user+system,
// whole process) of the timed region (first submit until every event has been
// handled), and the handler's measured mean wall time when it sleeps.
//
// Standard library only; build with `go build` inside this directory.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"hash/fnv"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// messageHandler is the seed's MessageHandler.
type messageHandler func(ctx context.Context, value []byte) error

// aggregateMessage carries what the seed's AggregateMessage carries,
// including the handler added by the global-pool migration.
type aggregateMessage struct {
	Topic       string
	Partition   int32
	Offset      int64
	Key         []byte
	Value       []byte
	Headers     map[string][]byte
	Timestamp   time.Time
	AggregateID string
	Context     context.Context
	Done        chan error
	Handler     messageHandler
}

var errWorkerQueueFull = errors.New("keyed worker queue full")

type keyedWorkerPool struct {
	waitTimeout time.Duration
	workers     []chan *aggregateMessage
	wg          sync.WaitGroup
}

func newKeyedWorkerPool(workerCount, queueSize int, waitTimeout time.Duration) *keyedWorkerPool {
	kp := &keyedWorkerPool{waitTimeout: waitTimeout, workers: make([]chan *aggregateMessage, workerCount)}
	for i := range kp.workers {
		ch := make(chan *aggregateMessage, queueSize)
		kp.workers[i] = ch
		kp.wg.Add(1)
		go kp.runWorker(ch)
	}
	return kp
}

func (kp *keyedWorkerPool) runWorker(ch chan *aggregateMessage) {
	defer kp.wg.Done()
	for msg := range ch {
		var err error
		if msg.Handler != nil {
			err = msg.Handler(msg.Context, msg.Value)
		} else {
			err = errors.New("no handler available for message")
		}
		select {
		case msg.Done <- err:
		default:
		}
	}
}

// processMessage routes msg to its worker: a non-blocking send first, then a
// wait of at most waitTimeout for room.
func (kp *keyedWorkerPool) processMessage(ctx context.Context, msg *aggregateMessage) error {
	if msg.AggregateID == "" {
		return errors.New("aggregateID required for keyed worker pool")
	}
	ch := kp.workers[kp.hashToIndex(msg.AggregateID)]
	select {
	case ch <- msg:
		return nil
	default:
	}
	timer := time.NewTimer(kp.waitTimeout)
	defer timer.Stop()
	select {
	case ch <- msg:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-timer.C:
		return errWorkerQueueFull
	}
}

// drain closes every worker's channel and waits until the workers have
// handled what was queued and exited.
func (kp *keyedWorkerPool) drain() {
	for _, ch := range kp.workers {
		close(ch)
	}
	kp.wg.Wait()
}

func (kp *keyedWorkerPool) hashToIndex(key string) int {
	return int(fnv32a(key) % uint32(len(kp.workers)))
}

func fnv32a(key string) uint32 {
	h := fnv.New32a()
	_, _ = h.Write([]byte(key))
	return h.Sum32()
}

// submit is the seed's consumer calling ProcessMessage: on a full queue it
// retries (the message must not be lost).
func submit(ctx context.Context, kp *keyedWorkerPool, msg *aggregateMessage) {
	for {
		err := kp.processMessage(ctx, msg)
		if err == nil {
			return
		}
		if !errors.Is(err, errWorkerQueueFull) {
			fmt.Fprintln(os.Stderr, "seedpool:", err)
			os.Exit(1)
		}
	}
}

func newMessage(ctx context.Context, key string, offset int64, partition int32, handler messageHandler) *aggregateMessage {
	return &aggregateMessage{
		Topic:       "bench",
		Partition:   partition,
		Offset:      offset,
		Key:         []byte(key),
		Headers:     make(map[string][]byte),
		Timestamp:   time.Now(),
		AggregateID: key,
		Context:     ctx,
		Done:        make(chan error, 1),
		Handler:     handler,
	}
}

type result struct {
	Mode          string  `json:"mode"`
	Events        int     `json:"events"`
	Handled       int64   `json:"handled"`
	WallNs        int64   `json:"wall_ns"`
	CPUNs         int64   `json:"cpu_ns"`
	HandlerMeanNs float64 `json:"handler_mean_ns"`
	GoMaxProcs    int     `json:"gomaxprocs"`
	GoVersion     string  `json:"go_version"`
}

func cpuNow() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func main() {
	mode := flag.String("mode", "flood", "flood | partitions")
	events := flag.Int("events", 1_000_000, "events to handle")
	nkeys := flag.Int("keys", 10_000, "distinct aggregate IDs; event i has key i mod keys")
	handlerKind := flag.String("handler", "trivial", "trivial | sleep")
	sleepFor := flag.Duration("sleep", time.Millisecond, "what the sleep handler sleeps")
	partitions := flag.Int("partitions", 15, "partitions (mode partitions)")
	wait := flag.Bool("wait", true, "mode partitions: each reader waits for a message's result before the next (the seed's ConsumeClaim)")
	workers := flag.Int("workers", 256, "workers")
	queue := flag.Int("queue", 1000, "queue size per worker")
	waitTimeout := flag.Duration("wait-timeout", 500*time.Millisecond, "how long ProcessMessage waits for room")
	flag.Parse()
	if *events <= 0 || *nkeys <= 0 || *partitions <= 0 || *workers <= 0 || *queue <= 0 {
		fmt.Fprintln(os.Stderr, "seedpool: counts must be positive")
		os.Exit(2)
	}

	keys := make([]string, *nkeys)
	for k := range keys {
		keys[k] = fmt.Sprintf("aggregate-%06d", k)
	}
	var handled int64
	var handlerNs int64
	var handler messageHandler
	switch *handlerKind {
	case "trivial":
		handler = func(context.Context, []byte) error {
			atomic.AddInt64(&handled, 1)
			return nil
		}
	case "sleep":
		d := *sleepFor
		handler = func(context.Context, []byte) error {
			start := time.Now()
			time.Sleep(d)
			atomic.AddInt64(&handlerNs, int64(time.Since(start)))
			atomic.AddInt64(&handled, 1)
			return nil
		}
	default:
		fmt.Fprintln(os.Stderr, "seedpool: -handler must be trivial or sleep")
		os.Exit(2)
	}

	ctx := context.Background()
	kp := newKeyedWorkerPool(*workers, *queue, *waitTimeout)
	var wall time.Duration
	var cpu time.Duration
	switch *mode {
	case "flood":
		cpu0, start := cpuNow(), time.Now()
		for i := 0; i < *events; i++ {
			submit(ctx, kp, newMessage(ctx, keys[i%*nkeys], int64(i), 0, handler))
		}
		kp.drain()
		wall, cpu = time.Since(start), cpuNow()-cpu0
	case "partitions":
		parts := make([][]string, *partitions)
		for i := 0; i < *events; i++ {
			key := keys[i%*nkeys]
			p := fnv32a(key) % uint32(*partitions)
			parts[p] = append(parts[p], key)
		}
		var readers sync.WaitGroup
		cpu0, start := cpuNow(), time.Now()
		for p, part := range parts {
			readers.Add(1)
			go func(p int32, part []string) {
				defer readers.Done()
				for offset, key := range part {
					msg := newMessage(ctx, key, int64(offset), p, handler)
					submit(ctx, kp, msg)
					if *wait {
						if err := <-msg.Done; err != nil {
							fmt.Fprintln(os.Stderr, "seedpool: handler failed:", err)
							os.Exit(1)
						}
					}
				}
			}(int32(p), part)
		}
		readers.Wait()
		kp.drain()
		wall, cpu = time.Since(start), cpuNow()-cpu0
	default:
		fmt.Fprintln(os.Stderr, "seedpool: -mode must be flood or partitions")
		os.Exit(2)
	}

	if atomic.LoadInt64(&handled) != int64(*events) {
		fmt.Fprintf(os.Stderr, "seedpool: handled %d of %d events\n", handled, *events)
		os.Exit(1)
	}
	res := result{
		Mode:       *mode,
		Events:     *events,
		Handled:    handled,
		WallNs:     int64(wall),
		CPUNs:      int64(cpu),
		GoMaxProcs: runtime.GOMAXPROCS(0),
		GoVersion:  runtime.Version(),
	}
	if *handlerKind == "sleep" {
		res.HandlerMeanNs = float64(handlerNs) / float64(handled)
	}
	if err := json.NewEncoder(os.Stdout).Encode(res); err != nil {
		os.Exit(1)
	}
}
