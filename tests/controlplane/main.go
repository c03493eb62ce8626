// Command controlplane is Cubicle's local Kubernetes control plane for tests and demos.
//
// It is one multi-call binary built from the upstream Kubernetes 1.33 and etcd 3.5 Go modules:
//
//	controlplane etcd ...                     the etcd server (etcdmain, full CLI)
//	controlplane kube-apiserver ...           upstream kube-apiserver
//	controlplane kube-controller-manager ...  upstream kube-controller-manager
//	controlplane kube-scheduler ...           upstream kube-scheduler
//	controlplane kubelet ...                  upstream kubelet (the real node, see tests/node)
//	controlplane relay --listen A --to B      the real node's stand-in for kube-proxy (kubernetes Service)
//	controlplane up --dir DIR                 orchestrates all four as separate processes
//
// Every component runs in its own process (the upstream mains install process-wide signal
// handlers and global flag registries, so they cannot share one process). `up` generates a PKI,
// picks free loopback ports, starts the components in order, waits for each to be ready, writes
// DIR/kubeconfig and then DIR/ready, and stops everything on SIGINT/SIGTERM or, with
// --exit-on-stdin-eof, when its standard input closes (its parent died).
package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
	_ "time/tzdata" // CronJob time zones, as upstream

	"go.etcd.io/etcd/server/v3/etcdmain"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	kcm "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: controlplane {up|etcd|kube-apiserver|kube-controller-manager|kube-scheduler|kubelet|relay} [flags]")
		os.Exit(2)
	}
	sub, rest := os.Args[1], os.Args[2:]
	switch sub {
	case "etcd":
		etcdmain.Main(append([]string{"etcd"}, rest...))
	case "kube-apiserver":
		c := apiserver.NewAPIServerCommand()
		c.SetArgs(rest)
		os.Exit(cli.Run(c))
	case "kube-controller-manager":
		c := kcm.NewControllerManagerCommand()
		c.SetArgs(rest)
		os.Exit(cli.Run(c))
	case "kube-scheduler":
		c := scheduler.NewSchedulerCommand()
		c.SetArgs(rest)
		os.Exit(cli.Run(c))
	case "kubelet":
		kubeletMain(rest)
	case "relay":
		relay(rest)
	case "up":
		if err := up(rest); err != nil {
			fmt.Fprintln(os.Stderr, "controlplane up:", err)
			os.Exit(1)
		}
	default:
		fmt.Fprintf(os.Stderr, "controlplane: unknown sub-command %q\n", sub)
		os.Exit(2)
	}
}

// Ready is what `up` writes to DIR/ready once the control plane serves.
type Ready struct {
	Kubeconfig string         `json:"kubeconfig"`
	Server     string         `json:"server"`
	Token      string         `json:"token"`
	CAFile     string         `json:"caFile"`
	LogDir     string         `json:"logDir"`
	Pids       map[string]int `json:"pids"`
	StartupMs  int64          `json:"startupMs"`
}

type component struct {
	name string
	cmd  *exec.Cmd
	log  *os.File
	done chan struct{}
}

type plane struct {
	dir   string
	self  string
	mu    sync.Mutex
	comps []*component
}

func up(args []string) error {
	fs := flag.NewFlagSet("up", flag.ExitOnError)
	dir := fs.String("dir", "", "working directory (created; required)")
	dataDir := fs.String("etcd-data-dir", "", "etcd data directory (default: a fresh directory under /dev/shm, else DIR/etcd)")
	stdinEOF := fs.Bool("exit-on-stdin-eof", false, "shut down when standard input closes")
	timeout := fs.Duration("timeout", 180*time.Second, "how long to wait for each component to become ready")
	port := fs.Int("port", 0, "kube-apiserver secure port (0: pick a free one)")
	extraTokens := fs.String("extra-tokens", "", "a file of more static-token identities (CSV lines token,user,uid,\"g1,g2\"), appended to the admin's")
	authConfig := fs.String("authentication-config", "", "an AuthenticationConfiguration file for the kube-apiserver (e.g. the OIDC issuers it trusts; `cubicle dev up --oidc` writes one)")
	_ = fs.Parse(args)
	if *dir == "" {
		return errors.New("--dir is required")
	}
	start := time.Now()
	abs, err := filepath.Abs(*dir)
	if err != nil {
		return err
	}
	for _, d := range []string{abs, filepath.Join(abs, "pki"), filepath.Join(abs, "logs")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return err
		}
	}
	_ = os.Remove(filepath.Join(abs, "ready"))
	self, err := os.Executable()
	if err != nil {
		return err
	}
	p := &plane{dir: abs, self: self}

	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer cancel()
	if *stdinEOF {
		go func() {
			_, _ = io.Copy(io.Discard, os.Stdin)
			cancel()
		}()
	}
	defer p.stopAll()

	pki, err := writePKI(filepath.Join(abs, "pki"))
	if err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	token := randomHex(24)
	tokens := fmt.Sprintf("%s,admin,admin,\"system:masters\"\n", token)
	if *extraTokens != "" {
		more, err := os.ReadFile(*extraTokens)
		if err != nil {
			return fmt.Errorf("--extra-tokens: %w", err)
		}
		tokens += string(more)
	}
	if err := os.WriteFile(filepath.Join(abs, "tokens.csv"), []byte(tokens), 0o600); err != nil {
		return err
	}

	// etcd
	etcdDir := *dataDir
	if etcdDir == "" {
		if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
			etcdDir, err = os.MkdirTemp("/dev/shm", "cubicle-etcd-")
			if err != nil {
				return err
			}
		} else {
			etcdDir = filepath.Join(abs, "etcd")
		}
		defer os.RemoveAll(etcdDir)
	}
	ec, ep := freePort(), freePort()
	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", ec)
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", ep)
	if err := p.start(ctx, "etcd",
		"--name=cubicle", "--data-dir="+etcdDir,
		"--listen-client-urls="+etcdURL, "--advertise-client-urls="+etcdURL,
		"--listen-peer-urls="+peerURL, "--initial-advertise-peer-urls="+peerURL,
		"--initial-cluster=cubicle="+peerURL, "--unsafe-no-fsync",
		"--listen-metrics-urls=", "--log-level=warn"); err != nil {
		return err
	}
	if err := waitHTTP(ctx, p, "etcd", etcdURL+"/health", nil, "", *timeout); err != nil {
		return err
	}

	// kube-apiserver
	apiPort := *port
	if apiPort == 0 {
		apiPort = freePort()
	}
	server := fmt.Sprintf("https://127.0.0.1:%d", apiPort)
	apiArgs := []string{"--etcd-servers=" + etcdURL}
	if *authConfig != "" {
		// Structured authentication (beta, on by default in 1.33): the JWT issuers it trusts,
		// beside the static tokens. The API server reloads the file when it changes.
		cfg, err := filepath.Abs(*authConfig)
		if err != nil {
			return err
		}
		apiArgs = append(apiArgs, "--authentication-config="+cfg)
	}
	if err := p.start(ctx, "kube-apiserver", append(apiArgs,
		"--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
		fmt.Sprintf("--secure-port=%d", apiPort),
		"--tls-cert-file="+pki.serverCert, "--tls-private-key-file="+pki.serverKey,
		"--client-ca-file="+pki.caCert,
		"--token-auth-file="+filepath.Join(abs, "tokens.csv"),
		"--authorization-mode=RBAC",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-signing-key-file="+pki.saKey,
		"--service-account-key-file="+pki.saPub,
		"--service-cluster-ip-range=10.96.0.0/12",
		"--endpoint-reconciler-type=none",
		"--allow-privileged=true",
		// A real node (tests/node) is reached at its InternalIP: the default tries its name first,
		// which would go out to DNS.
		"--kubelet-preferred-address-types=InternalIP",
		"--kubelet-client-certificate="+pki.kubeletClientCert,
		"--kubelet-client-key="+pki.kubeletClientKey,
		"--profiling=false", "--v=1")...); err != nil {
		return err
	}
	caPool := x509.NewCertPool()
	caPEM, _ := os.ReadFile(pki.caCert)
	caPool.AppendCertsFromPEM(caPEM)
	if err := waitHTTP(ctx, p, "kube-apiserver", server+"/readyz", caPool, token, *timeout); err != nil {
		return err
	}

	kubeconfig := filepath.Join(abs, "kubeconfig")
	kc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: cubicle-local
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: admin
  user:
    token: %s
contexts:
- name: cubicle-local
  context: {cluster: cubicle-local, user: admin, namespace: default}
current-context: cubicle-local
`, server, base64.StdEncoding.EncodeToString(caPEM), token)
	if err := os.WriteFile(kubeconfig, []byte(kc), 0o600); err != nil {
		return err
	}

	if err := p.start(ctx, "kube-controller-manager",
		"--kubeconfig="+kubeconfig,
		"--authentication-kubeconfig="+kubeconfig, "--authorization-kubeconfig="+kubeconfig,
		"--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=0",
		"--root-ca-file="+pki.caCert,
		"--service-account-private-key-file="+pki.saKey,
		"--cluster-signing-cert-file="+pki.caCert, "--cluster-signing-key-file="+pki.caKey,
		"--controllers=*",
		// Client budget: the default (20 QPS) makes the PV binder, not the API server, the limit
		// of a burst of thousands of profile claims; the session benchmark measures the
		// operator against the API server, so both have room here.
		"--kube-api-qps=200", "--kube-api-burst=400",
		"--v=1"); err != nil {
		return err
	}
	if err := p.start(ctx, "kube-scheduler",
		"--kubeconfig="+kubeconfig,
		"--authentication-kubeconfig="+kubeconfig, "--authorization-kubeconfig="+kubeconfig,
		"--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=0",
		"--kube-api-qps=200", "--kube-api-burst=400",
		"--v=1"); err != nil {
		return err
	}
	// The control plane is usable once the service-account controller has made default/default.
	if err := waitHTTP(ctx, p, "kube-controller-manager",
		server+"/api/v1/namespaces/default/serviceaccounts/default", caPool, token, *timeout); err != nil {
		return err
	}

	ready := Ready{
		Kubeconfig: kubeconfig, Server: server, Token: token, CAFile: pki.caCert,
		LogDir: filepath.Join(abs, "logs"), Pids: map[string]int{},
		StartupMs: time.Since(start).Milliseconds(),
	}
	p.mu.Lock()
	for _, c := range p.comps {
		ready.Pids[c.name] = c.cmd.Process.Pid
	}
	p.mu.Unlock()
	b, _ := json.MarshalIndent(ready, "", "  ")
	tmp := filepath.Join(abs, "ready.tmp")
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	if err := os.Rename(tmp, filepath.Join(abs, "ready")); err != nil {
		return err
	}
	fmt.Printf("control plane ready in %.1fs: %s (KUBECONFIG=%s)\n",
		time.Since(start).Seconds(), server, kubeconfig)

	// Run until told to stop, or until a component dies.
	dead := make(chan string, 8)
	for _, c := range p.comps {
		c := c
		go func() { <-c.done; dead <- c.name }()
	}
	select {
	case <-ctx.Done():
		fmt.Println("control plane: stopping")
		return nil
	case name := <-dead:
		return fmt.Errorf("%s exited; see %s", name, filepath.Join(abs, "logs", name+".log"))
	}
}

func (p *plane) start(ctx context.Context, name string, args ...string) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	logf, err := os.OpenFile(filepath.Join(p.dir, "logs", name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	cmd := exec.Command(p.self, append([]string{name}, args...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Children die with us even if we are SIGKILLed.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start %s: %w", name, err)
	}
	c := &component{name: name, cmd: cmd, log: logf, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(c.done) }()
	p.mu.Lock()
	p.comps = append(p.comps, c)
	p.mu.Unlock()
	return nil
}

// stopAll stops components in reverse start order: SIGTERM, then SIGKILL after a grace period.
func (p *plane) stopAll() {
	p.mu.Lock()
	comps := append([]*component(nil), p.comps...)
	p.mu.Unlock()
	for i := len(comps) - 1; i >= 0; i-- {
		c := comps[i]
		_ = c.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-c.done:
		case <-time.After(10 * time.Second):
			_ = c.cmd.Process.Kill()
			<-c.done
		}
		c.log.Close()
	}
}

func (p *plane) exited(name string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.comps {
		if c.name == name {
			select {
			case <-c.done:
				return true
			default:
			}
		}
	}
	return false
}

func waitHTTP(ctx context.Context, p *plane, name, url string, ca *x509.CertPool, token string, timeout time.Duration) error {
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: ca},
		Proxy:           nil,
	}}
	deadline := time.Now().Add(timeout)
	var last string
	for time.Now().Before(deadline) {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if p.exited(name) {
			return fmt.Errorf("%s exited during startup; last lines of %s:\n%s", name,
				filepath.Join(p.dir, "logs", name+".log"), tail(filepath.Join(p.dir, "logs", name+".log"), 30))
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := client.Do(req)
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return nil
			}
			last = fmt.Sprintf("HTTP %d: %s", resp.StatusCode, strings.TrimSpace(string(body)))
		} else {
			last = err.Error()
		}
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("%s not ready after %s (%s): %s", name, timeout, url, last)
}

func tail(path string, n int) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	var lines []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1024*1024), 1024*1024)
	for sc.Scan() {
		lines = append(lines, sc.Text())
		if len(lines) > n {
			lines = lines[1:]
		}
	}
	return strings.Join(lines, "\n")
}

func freePort() int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

type pkiFiles struct {
	caCert, caKey, serverCert, serverKey, saKey, saPub string
	// The API server's client certificate for kubelets (logs, exec, port-forward): the real
	// node's kubelet refuses anonymous callers and checks this against the CA.
	kubeletClientCert, kubeletClientKey string
}

func writePKI(dir string) (*pkiFiles, error) {
	f := &pkiFiles{
		caCert: filepath.Join(dir, "ca.crt"), caKey: filepath.Join(dir, "ca.key"),
		serverCert: filepath.Join(dir, "apiserver.crt"), serverKey: filepath.Join(dir, "apiserver.key"),
		saKey: filepath.Join(dir, "sa.key"), saPub: filepath.Join(dir, "sa.pub"),
		kubeletClientCert: filepath.Join(dir, "apiserver-kubelet-client.crt"),
		kubeletClientKey:  filepath.Join(dir, "apiserver-kubelet-client.key"),
	}
	now := time.Now().Add(-time.Hour)
	caKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "cubicle-local-ca"},
		NotBefore:             now,
		NotAfter:              now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	ca, _ := x509.ParseCertificate(caDER)
	srvKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	srvTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "kube-apiserver"},
		NotBefore:    now,
		NotAfter:     now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("10.96.0.1")},
		DNSNames: []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
			"kubernetes.default.svc.cluster.local"},
	}
	srvDER, err := x509.CreateCertificate(rand.Reader, srvTmpl, ca, &srvKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	kcKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	// As kubeadm's apiserver-kubelet-client, but in system:masters: the kubelet's webhook
	// authorization (a SubjectAccessReview) then allows it without a ClusterRoleBinding.
	kcTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(3),
		Subject:      pkix.Name{CommonName: "kube-apiserver-kubelet-client", Organization: []string{"system:masters"}},
		NotBefore:    now,
		NotAfter:     now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	kcDER, err := x509.CreateCertificate(rand.Reader, kcTmpl, ca, &kcKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	saKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	saPubDER, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return nil, err
	}
	writes := []struct {
		path, typ string
		der       []byte
	}{
		{f.caCert, "CERTIFICATE", caDER},
		{f.caKey, "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(caKey)},
		{f.serverCert, "CERTIFICATE", srvDER},
		{f.serverKey, "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(srvKey)},
		{f.kubeletClientCert, "CERTIFICATE", kcDER},
		{f.kubeletClientKey, "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(kcKey)},
		{f.saKey, "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(saKey)},
		{f.saPub, "PUBLIC KEY", saPubDER},
	}
	for _, w := range writes {
		if err := os.WriteFile(w.path, pem.EncodeToMemory(&pem.Block{Type: w.typ, Bytes: w.der}), 0o600); err != nil {
			return nil, err
		}
	}
	return f, nil
}
