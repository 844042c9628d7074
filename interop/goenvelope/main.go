// Command goenvelope is the Go peer of eventbus's wire interop tests
// (tests/interop.rs, docs/wire.md). Standard library only.
//
// It carries the seed's envelope struct in its two wire forms:
//
//   - "base64": the seed (jxt-core at deab3fb): Payload is a plain []byte
//     marshalled by encoding/json, so it is written as a base64 string;
//   - "raw": the same struct with json.RawMessage, so the payload JSON is
//     embedded as is (what later jxt-core versions write with jsoniter).
//
// Commands (FORM is base64 or raw):
//
//	goenvelope encode FORM
//	    writes the 20 test envelopes, one JSON line each
//	goenvelope decode FORM
//	    reads envelopes from stdin, one per line; for each writes one JSON
//	    line: the fields as Go decoded and validated them, or the error
//	goenvelope decode-b64 FORM
//	    the same, each stdin line the base64 of one envelope (any bytes)
//	goenvelope nats-publish ADDR SUBJECT FORM
//	    publishes the 20 test envelopes to SUBJECT with the raw NATS text
//	    protocol over TCP (PUB with a reply inbox, waiting for each
//	    JetStream ack); writes "acked N" at the end
//	goenvelope nats-get ADDR STREAM FIRST COUNT FORM
//	    reads COUNT messages from the JetStream stream STREAM, sequences
//	    FIRST.., with $JS.API.STREAM.MSG.GET; decodes each like "decode"
package main

import (
	"bufio"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"time"
)

// SeedEnvelope is the seed's struct: Payload is a []byte (base64 on the wire).
type SeedEnvelope struct {
	AggregateID   string    `json:"aggregate_id"`
	EventType     string    `json:"event_type"`
	EventVersion  int64     `json:"event_version"`
	Timestamp     time.Time `json:"timestamp"`
	TraceID       string    `json:"trace_id,omitempty"`
	CorrelationID string    `json:"correlation_id,omitempty"`
	Payload       []byte    `json:"payload"`
}

// RawEnvelope is the same struct with the payload embedded as JSON.
type RawEnvelope struct {
	AggregateID   string          `json:"aggregate_id"`
	EventType     string          `json:"event_type"`
	EventVersion  int64           `json:"event_version"`
	Timestamp     time.Time       `json:"timestamp"`
	TraceID       string          `json:"trace_id,omitempty"`
	CorrelationID string          `json:"correlation_id,omitempty"`
	Payload       json.RawMessage `json:"payload"`
}

// fields is what both forms hold, for validation and printing.
type fields struct {
	AggregateID, EventType, TraceID, CorrelationID string
	EventVersion                                   int64
	Timestamp                                      time.Time
	Payload                                        []byte
}

// validate is the seed's Envelope.Validate.
func validate(f fields) error {
	if strings.TrimSpace(f.AggregateID) == "" {
		return errors.New("aggregate_id is required")
	}
	if strings.TrimSpace(f.EventType) == "" {
		return errors.New("event_type is required")
	}
	if f.EventVersion <= 0 {
		return errors.New("event_version must be positive")
	}
	if len(f.Payload) == 0 {
		return errors.New("payload is required")
	}
	if err := validateAggregateID(f.AggregateID); err != nil {
		return fmt.Errorf("invalid aggregate_id: %w", err)
	}
	return nil
}

// validateAggregateID is the seed's validateAggregateID.
func validateAggregateID(id string) error {
	id = strings.TrimSpace(id)
	if id == "" {
		return errors.New("aggregate_id cannot be empty")
	}
	if len(id) > 256 {
		return errors.New("aggregate_id too long (max 256 characters)")
	}
	for _, r := range id {
		switch {
		case r >= 'a' && r <= 'z':
		case r >= 'A' && r <= 'Z':
		case r >= '0' && r <= '9':
		case r == ':' || r == '_' || r == '-' || r == '.' || r == '/':
		default:
			return fmt.Errorf("aggregate_id contains invalid character: %c", r)
		}
	}
	return nil
}

type testCase struct {
	id, eventType, timestamp, trace, corr, payload string
	version                                        int64
}

const ts = "2024-01-02T15:04:05.123456789Z"

// cases are the 20 test envelopes of /work/shared/interop (payload as JSON text).
func cases() []testCase {
	long := strings.Repeat("a", 250) + "-._:/9"
	c := []testCase{
		{"order-1", "OrderCreated", ts, "", "", `{"orderId":"o-1","amount":12.5}`, 1},
		{"order-2", "ItemsAdded", ts, "", "", `[1,2,3]`, 1},
		{"order-3", "Note", ts, "", "", `"hello"`, 1},
		{"order-4", "Counted", ts, "", "", `42`, 1},
		{"order-5", "Nested", ts, "", "", `{"a":{"b":{"c":[1,{"d":null,"e":[[],{}]}]}}}`, 2},
		{"order-6", "订单已创建", ts, "追踪-1", "", `{"名字":"张三","emoji":"😀"}`, 1},
		{"order-7", "T", ts, "trace-abc", "", `{"x":1}`, 1},
		{"order-8", "T", ts, "", "corr-xyz", `{"x":1}`, 1},
		{"order-9", "T", ts, "t-1", "c-1", `{"x":1}`, 1},
		{"order-10", "T", ts, "", "", `{"x":1}`, 1},
		{"order-11", "T", ts, "", "", `{}`, 1},
		{"order-12", "T", "2024-01-02T15:04:05.12Z", "", "", `{}`, 1},
		{"order-13", "T", "2024-01-02T15:04:05Z", "", "", `{}`, 1},
		{"order-14", "T", "2024-01-02T15:04:05.0000001+08:00", "", "", `{}`, 1},
		{"order-15", "T", "2024-01-02T15:04:05.5-03:30", "", "", `{}`, 1},
		{"tenant:acme/order_2024-01.x", "T", ts, "", "", `{}`, 1},
		{long, "T", ts, "", "", `{}`, 1},
		{"order-18", "T", ts, "", "", `true`, 1},
		{"order-19", "Html<Event>", ts, "", "", `{"html":"<b>&amp;</b>","nl":"a\nb","q":"\"x\""}`, 1},
		{"order-20", "T", "0001-01-01T00:00:00Z", "", "", `{"v":null}`, 9223372036854775807},
	}
	return c
}

func encode(form string) ([][]byte, error) {
	var out [][]byte
	for _, c := range cases() {
		t, err := time.Parse(time.RFC3339Nano, c.timestamp)
		if err != nil {
			return nil, err
		}
		var v interface{}
		switch form {
		case "base64":
			v = SeedEnvelope{c.id, c.eventType, c.version, t, c.trace, c.corr, []byte(c.payload)}
		case "raw":
			v = RawEnvelope{c.id, c.eventType, c.version, t, c.trace, c.corr, json.RawMessage(c.payload)}
		default:
			return nil, fmt.Errorf("unknown form %q", form)
		}
		b, err := json.Marshal(v)
		if err != nil {
			return nil, err
		}
		out = append(out, b)
	}
	return out, nil
}

// decoded is one line of "decode" output.
type decoded struct {
	OK            bool   `json:"ok"`
	Error         string `json:"error,omitempty"`
	AggregateID   string `json:"aggregate_id,omitempty"`
	EventType     string `json:"event_type,omitempty"`
	EventVersion  int64  `json:"event_version,omitempty"`
	Timestamp     string `json:"timestamp,omitempty"`
	TraceID       string `json:"trace_id,omitempty"`
	CorrelationID string `json:"correlation_id,omitempty"`
	// PayloadB64 is the payload bytes Go holds, base64, whatever the form.
	PayloadB64 string `json:"payload_b64,omitempty"`
}

func decode(form string, line []byte) decoded {
	var f fields
	switch form {
	case "base64":
		var e SeedEnvelope
		if err := json.Unmarshal(line, &e); err != nil {
			return decoded{Error: err.Error()}
		}
		f = fields{e.AggregateID, e.EventType, e.TraceID, e.CorrelationID, e.EventVersion, e.Timestamp, e.Payload}
	case "raw":
		var e RawEnvelope
		if err := json.Unmarshal(line, &e); err != nil {
			return decoded{Error: err.Error()}
		}
		f = fields{e.AggregateID, e.EventType, e.TraceID, e.CorrelationID, e.EventVersion, e.Timestamp, e.Payload}
	default:
		return decoded{Error: fmt.Sprintf("unknown form %q", form)}
	}
	if err := validate(f); err != nil {
		return decoded{Error: err.Error()}
	}
	return decoded{
		OK: true, AggregateID: f.AggregateID, EventType: f.EventType, EventVersion: f.EventVersion,
		Timestamp: f.Timestamp.Format(time.RFC3339Nano), TraceID: f.TraceID, CorrelationID: f.CorrelationID,
		PayloadB64: base64.StdEncoding.EncodeToString(f.Payload),
	}
}

func printJSON(w *bufio.Writer, v interface{}) {
	b, err := json.Marshal(v)
	if err != nil {
		fail(err)
	}
	w.Write(b)
	w.WriteByte('\n')
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "goenvelope:", err)
	os.Exit(1)
}

// natsConn is a minimal NATS client over the text protocol.
type natsConn struct {
	c net.Conn
	r *bufio.Reader
}

func natsDial(addr string) (*natsConn, error) {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(60 * time.Second))
	n := &natsConn{c: c, r: bufio.NewReader(c)}
	info, err := n.r.ReadString('\n')
	if err != nil || !strings.HasPrefix(info, "INFO ") {
		return nil, fmt.Errorf("no INFO from %s: %q %v", addr, info, err)
	}
	if _, err := fmt.Fprintf(c, "CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true,\"name\":\"goenvelope\"}\r\nPING\r\n"); err != nil {
		return nil, err
	}
	if _, _, err := n.next(); err != nil {
		return nil, err
	}
	return n, nil
}

// next reads until a PONG (payload nil) or a MSG/HMSG (its payload and
// headers); answers PINGs and fails on -ERR.
func (n *natsConn) next() (payload []byte, headers []byte, err error) {
	for {
		line, err := n.r.ReadString('\n')
		if err != nil {
			return nil, nil, err
		}
		line = strings.TrimRight(line, "\r\n")
		switch {
		case line == "PING":
			fmt.Fprintf(n.c, "PONG\r\n")
		case line == "PONG":
			return nil, nil, nil
		case strings.HasPrefix(line, "+OK"), strings.HasPrefix(line, "INFO "):
		case strings.HasPrefix(line, "-ERR"):
			return nil, nil, errors.New(line)
		case strings.HasPrefix(line, "MSG "), strings.HasPrefix(line, "HMSG "):
			parts := strings.Fields(line)
			total, err := strconv.Atoi(parts[len(parts)-1])
			if err != nil {
				return nil, nil, fmt.Errorf("bad %q", line)
			}
			hdrLen := 0
			if parts[0] == "HMSG" {
				if hdrLen, err = strconv.Atoi(parts[len(parts)-2]); err != nil {
					return nil, nil, fmt.Errorf("bad %q", line)
				}
			}
			buf := make([]byte, total+2)
			if _, err := io_ReadFull(n.r, buf); err != nil {
				return nil, nil, err
			}
			return buf[hdrLen:total], buf[:hdrLen], nil
		default:
			return nil, nil, fmt.Errorf("unexpected %q", line)
		}
	}
}

func io_ReadFull(r *bufio.Reader, buf []byte) (int, error) {
	n := 0
	for n < len(buf) {
		m, err := r.Read(buf[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// request publishes body to subject with a reply inbox and returns the reply.
func (n *natsConn) request(subject string, body []byte) ([]byte, error) {
	if _, err := fmt.Fprintf(n.c, "PUB %s _INBOX.goenvelope %d\r\n%s\r\n", subject, len(body), body); err != nil {
		return nil, err
	}
	for {
		payload, hdrs, err := n.next()
		if err != nil {
			return nil, err
		}
		if payload != nil || hdrs != nil {
			// A reply with only headers is a no-responders status (503).
			if len(payload) == 0 && len(hdrs) > 0 {
				return nil, fmt.Errorf("no reply to %s: %q", subject, hdrs)
			}
			return payload, nil
		}
	}
}

func natsPublish(addr, subject, form string) error {
	n, err := natsDial(addr)
	if err != nil {
		return err
	}
	defer n.c.Close()
	fmt.Fprintf(n.c, "SUB _INBOX.goenvelope 1\r\n")
	envs, err := encode(form)
	if err != nil {
		return err
	}
	for i, e := range envs {
		reply, err := n.request(subject, e)
		if err != nil {
			return err
		}
		var ack struct {
			Stream string `json:"stream"`
			Seq    uint64 `json:"seq"`
			Error  *struct {
				Description string `json:"description"`
			} `json:"error"`
		}
		if err := json.Unmarshal(reply, &ack); err != nil || ack.Error != nil || ack.Seq == 0 {
			return fmt.Errorf("envelope %d: no JetStream ack: %s", i, reply)
		}
	}
	fmt.Printf("acked %d\n", len(envs))
	return nil
}

func natsGet(addr, stream string, first, count uint64, form string) error {
	n, err := natsDial(addr)
	if err != nil {
		return err
	}
	defer n.c.Close()
	fmt.Fprintf(n.c, "SUB _INBOX.goenvelope 1\r\n")
	w := bufio.NewWriter(os.Stdout)
	defer w.Flush()
	for seq := first; seq < first+count; seq++ {
		reply, err := n.request("$JS.API.STREAM.MSG.GET."+stream, []byte(fmt.Sprintf(`{"seq":%d}`, seq)))
		if err != nil {
			return err
		}
		var got struct {
			Message *struct {
				Data []byte `json:"data"`
			} `json:"message"`
			Error *struct {
				Description string `json:"description"`
			} `json:"error"`
		}
		if err := json.Unmarshal(reply, &got); err != nil || got.Message == nil {
			return fmt.Errorf("sequence %d: %s", seq, reply)
		}
		printJSON(w, decode(form, got.Message.Data))
	}
	return nil
}

func main() {
	args := os.Args[1:]
	if len(args) < 2 {
		fail(errors.New("usage: goenvelope encode|decode|nats-publish|nats-get ..."))
	}
	switch {
	case args[0] == "encode" && len(args) == 2:
		envs, err := encode(args[1])
		if err != nil {
			fail(err)
		}
		w := bufio.NewWriter(os.Stdout)
		for _, e := range envs {
			w.Write(e)
			w.WriteByte('\n')
		}
		w.Flush()
	case (args[0] == "decode" || args[0] == "decode-b64") && len(args) == 2:
		sc := bufio.NewScanner(os.Stdin)
		sc.Buffer(make([]byte, 0, 1<<16), 4<<20)
		w := bufio.NewWriter(os.Stdout)
		for sc.Scan() {
			line := sc.Bytes()
			if args[0] == "decode-b64" {
				var err error
				if line, err = base64.StdEncoding.DecodeString(string(line)); err != nil {
					fail(err)
				}
			}
			printJSON(w, decode(args[1], line))
		}
		w.Flush()
		if err := sc.Err(); err != nil {
			fail(err)
		}
	case args[0] == "nats-publish" && len(args) == 4:
		if err := natsPublish(args[1], args[2], args[3]); err != nil {
			fail(err)
		}
	case args[0] == "nats-get" && len(args) == 6:
		first, err1 := strconv.ParseUint(args[3], 10, 64)
		count, err2 := strconv.ParseUint(args[4], 10, 64)
		if err1 != nil || err2 != nil {
			fail(errors.New("FIRST and COUNT are numbers"))
		}
		if err := natsGet(args[1], args[2], first, count, args[5]); err != nil {
			fail(err)
		}
	default:
		fail(fmt.Errorf("bad arguments %q", args))
	}
}
