package main

// The real node's kubelet (tests/node starts it beside containerd and runc). It is upstream's
// kubelet main, unchanged, in its own process like every other component here.

import (
	"os"

	"k8s.io/component-base/cli"
	kubelet "k8s.io/kubernetes/cmd/kubelet/app"
)

func kubeletMain(args []string) {
	c := kubelet.NewKubeletCommand()
	c.SetArgs(args)
	os.Exit(cli.Run(c))
}
