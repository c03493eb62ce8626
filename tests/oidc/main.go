// A local OpenID Provider for Cubicle's demo and tests: zitadel/oidc's OpenID Provider package
// (pkg/op) with its example storage, serving the people of a users file and one confidential web
// client (the gateway). Not a mock: authorization code with PKCE, signed ID tokens, discovery.
//
//	oidc -listen 127.0.0.1:0 -users users.json -client-id cubicle -client-secret S \
//	     -redirect-uri http://cubicle.localhost:8080/.cubicle/callback -ready ready.json
//
// The users file maps ids to users (see storage.User: ID, Username, Password, Email...). Once
// listening it writes {"issuer": "http://127.0.0.1:PORT/"} to -ready.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"

	"github.com/zitadel/oidc/v3/example/server/exampleop"
	"github.com/zitadel/oidc/v3/example/server/storage"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on")
	users := flag.String("users", "", "users file (JSON)")
	clientID := flag.String("client-id", "cubicle", "the gateway's client id")
	clientSecret := flag.String("client-secret", "", "the gateway's client secret")
	redirects := flag.String("redirect-uri", "", "comma-separated redirect URIs of the gateway")
	ready := flag.String("ready", "", "file to write {\"issuer\": ...} to once listening")
	flag.Parse()
	if *users == "" || *clientSecret == "" || *redirects == "" {
		fmt.Fprintln(os.Stderr, "oidc: -users, -client-secret and -redirect-uri are required")
		os.Exit(2)
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		logger.Error("listen", "error", err)
		os.Exit(1)
	}
	issuer := fmt.Sprintf("http://%s/", ln.Addr().String())
	storage.RegisterClients(storage.WebClient(*clientID, *clientSecret, strings.Split(*redirects, ",")...))
	store, err := storage.StoreFromFile(*users)
	if err != nil {
		logger.Error("users file", "error", err)
		os.Exit(1)
	}
	router := exampleop.SetupServer(issuer, storage.NewStorage(store), logger, false)
	if *ready != "" {
		b, _ := json.Marshal(map[string]string{"issuer": issuer})
		if err := os.WriteFile(*ready+".tmp", b, 0o600); err == nil {
			err = os.Rename(*ready+".tmp", *ready)
		}
		if err != nil {
			logger.Error("ready file", "error", err)
			os.Exit(1)
		}
	}
	logger.Info("OpenID Provider listening", "issuer", issuer)
	if err := http.Serve(ln, router); err != nil {
		logger.Error("serve", "error", err)
		os.Exit(1)
	}
}
