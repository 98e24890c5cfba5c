// Command loadgen is the benchmark's load generator and Mailgun-compatible sink.
//
//	loadgen load -addr 127.0.0.1:2525 -ca ca.pem -users users.txt -concurrency 20 -sessions 2000 -msgs 1
//	loadgen mailgun -addr 127.0.0.1:8025
//
// `load` runs `-concurrency` workers; each session connects, EHLO, STARTTLS (verifying the
// certificate against -ca), EHLO, AUTH PLAIN, then `-msgs` messages (MAIL, RCPT, DATA), QUIT.
// Worker i logs in as line i of -users ("name password", cycled), so each worker repeats
// its own login. With -resume, TLS sessions are resumed from a shared client cache. It
// prints one JSON object: counts, elapsed seconds, session latency percentiles and its
// own CPU seconds (getrusage), so the generator's cost is reported beside the server's.
//
// `mailgun` answers POST /v3/{domain}/messages.mime with 200 and a JSON id (HTTP/1.1
// keep-alive; the relay's client speaks HTTP/1.1), counting messages; GET /count returns the
// count.
package main

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

type conn struct {
	c net.Conn
	r *bufio.Reader
}

func (c *conn) reply() (int, string, error) {
	var code int
	var text strings.Builder
	for {
		line, err := c.r.ReadString('\n')
		if err != nil {
			return 0, text.String(), err
		}
		if len(line) < 4 {
			return 0, line, fmt.Errorf("short reply %q", line)
		}
		fmt.Sscanf(line[:3], "%d", &code)
		text.WriteString(line)
		if line[3] != '-' {
			return code, text.String(), nil
		}
	}
}

func (c *conn) cmd(want int, format string, args ...any) error {
	if _, err := fmt.Fprintf(c.c, format+"\r\n", args...); err != nil {
		return err
	}
	code, text, err := c.reply()
	if err != nil {
		return err
	}
	if code != want {
		return fmt.Errorf("%q: got %s", strings.SplitN(format, " ", 2)[0], strings.TrimSpace(text))
	}
	return nil
}

type user struct{ name, password string }

func session(addr string, cfg *tls.Config, u user, msgs int, body []byte) error {
	raw, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return err
	}
	defer raw.Close()
	raw.SetDeadline(time.Now().Add(60 * time.Second))
	c := &conn{raw, bufio.NewReader(raw)}
	if code, text, err := c.reply(); err != nil || code != 220 {
		return fmt.Errorf("banner %q %v", text, err)
	}
	if err := c.cmd(250, "EHLO loadgen.bench"); err != nil {
		return err
	}
	if cfg != nil {
		if err := c.cmd(220, "STARTTLS"); err != nil {
			return err
		}
		t := tls.Client(raw, cfg)
		if err := t.Handshake(); err != nil {
			return err
		}
		c = &conn{t, bufio.NewReader(t)}
		if err := c.cmd(250, "EHLO loadgen.bench"); err != nil {
			return err
		}
	}
	if u.name != "" {
		blob := base64.StdEncoding.EncodeToString([]byte("\x00" + u.name + "\x00" + u.password))
		if err := c.cmd(235, "AUTH PLAIN %s", blob); err != nil {
			return err
		}
	}
	for i := 0; i < msgs; i++ {
		if err := c.cmd(250, "MAIL FROM:<bench@example.com>"); err != nil {
			return err
		}
		if err := c.cmd(250, "RCPT TO:<sink@example.net>"); err != nil {
			return err
		}
		if err := c.cmd(354, "DATA"); err != nil {
			return err
		}
		if _, err := c.c.Write(body); err != nil {
			return err
		}
		if err := c.cmd(250, "."); err != nil {
			return err
		}
	}
	return c.cmd(221, "QUIT")
}

func cpuSeconds() float64 {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return float64(ru.Utime.Sec+ru.Stime.Sec) + float64(ru.Utime.Usec+ru.Stime.Usec)/1e6
}

func percentile(sorted []float64, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(q*float64(len(sorted)-1) + 0.5)
	return sorted[i]
}

func load(args []string) {
	fs := flag.NewFlagSet("load", flag.ExitOnError)
	addr := fs.String("addr", "127.0.0.1:2525", "server address")
	caFile := fs.String("ca", "", "CA bundle; empty: no STARTTLS")
	usersFile := fs.String("users", "", "file of 'name password' lines; empty: no AUTH")
	concurrency := fs.Int("concurrency", 20, "sessions in flight")
	sessions := fs.Int("sessions", 1000, "sessions in total")
	msgs := fs.Int("msgs", 1, "messages per session")
	size := fs.Int("size", 2048, "message body bytes")
	resume := fs.Bool("resume", false, "resume TLS sessions")
	fs.Parse(args)

	var cfg *tls.Config
	if *caFile != "" {
		pem, err := os.ReadFile(*caFile)
		if err != nil {
			panic(err)
		}
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(pem)
		cfg = &tls.Config{RootCAs: pool, ServerName: "localhost"}
		if *resume {
			cfg.ClientSessionCache = tls.NewLRUClientSessionCache(256)
		}
	}
	var users []user
	if *usersFile != "" {
		text, err := os.ReadFile(*usersFile)
		if err != nil {
			panic(err)
		}
		for _, line := range strings.Split(strings.TrimSpace(string(text)), "\n") {
			parts := strings.SplitN(line, " ", 2)
			users = append(users, user{parts[0], parts[1]})
		}
	}
	var b strings.Builder
	b.WriteString("From: bench@example.com\r\nTo: sink@example.net\r\nSubject: bench\r\n\r\n")
	for b.Len() < *size {
		b.WriteString(strings.Repeat("x", 76) + "\r\n")
	}
	body := []byte(b.String()) // the "." that ends DATA is sent by session()

	var next int64 = -1
	var failures int64
	var firstErr atomic.Value
	latencies := make([][]float64, *concurrency)
	cpu0 := cpuSeconds()
	start := time.Now()
	var wg sync.WaitGroup
	for w := 0; w < *concurrency; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			u := user{}
			if len(users) > 0 {
				u = users[w%len(users)]
			}
			for atomic.AddInt64(&next, 1) < int64(*sessions) {
				began := time.Now()
				if err := session(*addr, cfg, u, *msgs, body); err != nil {
					atomic.AddInt64(&failures, 1)
					firstErr.CompareAndSwap(nil, err.Error())
					continue
				}
				latencies[w] = append(latencies[w], time.Since(began).Seconds())
			}
		}(w)
	}
	wg.Wait()
	elapsed := time.Since(start).Seconds()
	var all []float64
	for _, l := range latencies {
		all = append(all, l...)
	}
	sort.Float64s(all)
	out := map[string]any{
		"sessions":    len(all),
		"failures":    failures,
		"messages":    len(all) * *msgs,
		"elapsed":     elapsed,
		"p50":         percentile(all, 0.50),
		"p99":         percentile(all, 0.99),
		"cpu_seconds": cpuSeconds() - cpu0,
	}
	if e := firstErr.Load(); e != nil {
		out["first_error"] = e
	}
	json.NewEncoder(os.Stdout).Encode(out)
}

func mailgun(args []string) {
	fs := flag.NewFlagSet("mailgun", flag.ExitOnError)
	addr := fs.String("addr", "127.0.0.1:8025", "listen address")
	fs.Parse(args)
	var count int64
	mux := http.NewServeMux()
	mux.HandleFunc("/count", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%d\n", atomic.LoadInt64(&count))
	})
	mux.HandleFunc("/v3/", func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || !strings.HasSuffix(r.URL.Path, "/messages.mime") {
			http.Error(w, `{"message":"not found"}`, http.StatusNotFound)
			return
		}
		if user, _, ok := r.BasicAuth(); !ok || user != "api" {
			http.Error(w, `{"message":"Forbidden"}`, http.StatusUnauthorized)
			return
		}
		if err := r.ParseMultipartForm(32 << 20); err != nil || len(r.MultipartForm.File["message"]) == 0 || len(r.MultipartForm.Value["to"]) == 0 {
			http.Error(w, `{"message":"'message' and 'to' are required"}`, http.StatusBadRequest)
			return
		}
		r.MultipartForm.RemoveAll()
		n := atomic.AddInt64(&count, 1)
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"id":"<%d@sink.bench>","message":"Queued. Thank you."}`, n)
	})
	server := &http.Server{Addr: *addr, Handler: mux}
	io.WriteString(os.Stdout, "listening\n")
	if err := server.ListenAndServe(); err != nil {
		panic(err)
	}
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: loadgen load|mailgun [flags]")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "load":
		load(os.Args[2:])
	case "mailgun":
		mailgun(os.Args[2:])
	default:
		fmt.Fprintln(os.Stderr, "usage: loadgen load|mailgun [flags]")
		os.Exit(2)
	}
}
