package main

// `controlplane relay --listen ADDR --to ADDR` stands in for kube-proxy on the real node for the
// one Service pods need: `kubernetes` (10.96.0.1:443). The API server binds 127.0.0.1 only and
// the node runs no kube-proxy, so tests/node/node.sh puts 10.96.0.1 on the node's bridge and runs
// this relay, which copies bytes both ways to the API server's loopback port. TLS passes through
// untouched (the serving certificate already names 10.96.0.1), so in-cluster clients verify the
// API server exactly as on a real cluster.

import (
	"flag"
	"fmt"
	"io"
	"net"
	"os"
)

func relay(args []string) {
	fs := flag.NewFlagSet("relay", flag.ExitOnError)
	listen := fs.String("listen", "", "address to accept on (required)")
	to := fs.String("to", "", "address to connect to (required)")
	_ = fs.Parse(args)
	if *listen == "" || *to == "" {
		fmt.Fprintln(os.Stderr, "usage: controlplane relay --listen ADDR --to ADDR")
		os.Exit(2)
	}
	l, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, "controlplane relay:", err)
		os.Exit(1)
	}
	for {
		in, err := l.Accept()
		if err != nil {
			fmt.Fprintln(os.Stderr, "controlplane relay: accept:", err)
			os.Exit(1)
		}
		go func() {
			defer in.Close()
			out, err := net.Dial("tcp", *to)
			if err != nil {
				fmt.Fprintln(os.Stderr, "controlplane relay: dial:", err)
				return
			}
			defer out.Close()
			done := make(chan struct{}, 2)
			go func() { _, _ = io.Copy(out, in); done <- struct{}{} }()
			go func() { _, _ = io.Copy(in, out); done <- struct{}{} }()
			<-done
		}()
	}
}
