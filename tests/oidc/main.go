// A local OpenID Provider for Cubicle's demo and tests: zitadel/oidc's OpenID Provider package
// (pkg/op) with its example storage, serving the people of a users file and one confidential web
// client (the gateway). Not a mock: authorization code with PKCE, signed ID tokens, discovery.
//
//	oidc -listen 127.0.0.1:0 -users users.json -client-id cubicle -client-secret S \
//	     -redirect-uri http://cubicle.localhost:8080/.cubicle/callback -ready ready.json
//
// The users file maps ids to users (see storage.User: ID, Username, Password, Email...), each
// with an optional "Groups" list that ID tokens carry as the "groups" claim (what the gateway and
// the API server's --oidc-groups-claim read). Once listening it writes
// {"issuer": "http://127.0.0.1:PORT/"} to -ready. With -tls-cert and -tls-key (PEM files; the
// certificate file may hold the chain) it serves https and the issuer is https://127.0.0.1:PORT/,
// the form the kube-apiserver requires of an issuer it trusts.
package main

import (
	"context"
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
	"github.com/zitadel/oidc/v3/pkg/oidc"
	"github.com/zitadel/oidc/v3/pkg/op"
)

// withGroups is the example storage plus a "groups" claim in ID tokens and userinfo.
type withGroups struct {
	*storage.Storage
	groups map[string][]string
}

func (s withGroups) addGroups(userinfo *oidc.UserInfo, subject string) {
	if g, ok := s.groups[subject]; ok && len(g) > 0 {
		userinfo.AppendClaims("groups", g)
	}
}

// SetUserinfoFromRequest fills an ID token's claims.
func (s withGroups) SetUserinfoFromRequest(ctx context.Context, userinfo *oidc.UserInfo, token op.IDTokenRequest, scopes []string) error {
	if err := s.Storage.SetUserinfoFromRequest(ctx, userinfo, token, scopes); err != nil {
		return err
	}
	s.addGroups(userinfo, token.GetSubject())
	return nil
}

// SetUserinfoFromToken fills the userinfo endpoint's answer.
func (s withGroups) SetUserinfoFromToken(ctx context.Context, userinfo *oidc.UserInfo, tokenID, subject, origin string) error {
	if err := s.Storage.SetUserinfoFromToken(ctx, userinfo, tokenID, subject, origin); err != nil {
		return err
	}
	s.addGroups(userinfo, subject)
	return nil
}

// groupsOf reads the optional "Groups" of each user in the users file, by user ID.
func groupsOf(path string) (map[string][]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var users map[string]struct {
		ID     string
		Groups []string
	}
	if err := json.Unmarshal(b, &users); err != nil {
		return nil, err
	}
	out := map[string][]string{}
	for _, u := range users {
		out[u.ID] = u.Groups
	}
	return out, nil
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on")
	users := flag.String("users", "", "users file (JSON)")
	clientID := flag.String("client-id", "cubicle", "the gateway's client id")
	clientSecret := flag.String("client-secret", "", "the gateway's client secret")
	redirects := flag.String("redirect-uri", "", "comma-separated redirect URIs of the gateway")
	ready := flag.String("ready", "", "file to write {\"issuer\": ...} to once listening")
	tlsCert := flag.String("tls-cert", "", "serve https with this certificate (PEM, chain allowed)")
	tlsKey := flag.String("tls-key", "", "the key of -tls-cert (PEM)")
	flag.Parse()
	if (*tlsCert == "") != (*tlsKey == "") {
		fmt.Fprintln(os.Stderr, "oidc: -tls-cert and -tls-key go together")
		os.Exit(2)
	}
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
	scheme := "http"
	if *tlsCert != "" {
		scheme = "https"
	}
	issuer := fmt.Sprintf("%s://%s/", scheme, ln.Addr().String())
	storage.RegisterClients(storage.WebClient(*clientID, *clientSecret, strings.Split(*redirects, ",")...))
	store, err := storage.StoreFromFile(*users)
	if err != nil {
		logger.Error("users file", "error", err)
		os.Exit(1)
	}
	groups, err := groupsOf(*users)
	if err != nil {
		logger.Error("users file", "error", err)
		os.Exit(1)
	}
	router := exampleop.SetupServer(issuer, withGroups{storage.NewStorage(store), groups}, logger, false)
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
	var serveErr error
	if *tlsCert != "" {
		serveErr = http.ServeTLS(ln, router, *tlsCert, *tlsKey)
	} else {
		serveErr = http.Serve(ln, router)
	}
	if err := serveErr; err != nil {
		logger.Error("serve", "error", err)
		os.Exit(1)
	}
}
