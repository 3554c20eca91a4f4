# Shell helpers the benchmark scripts share: `. loadtest/lib.sh` after
# `cd` to the repository root.

stop() { # pid: stops a server and waits until it is gone
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
  while kill -0 "$1" 2>/dev/null; do sleep 0.1; done
}

cpu() { # pid → its CPU seconds so far (utime + stime, from /proc)
  awk -v hz="$(getconf CLK_TCK)" '{ print ($14 + $15) / hz }' "/proc/$1/stat"
}

wait_ready() { # admin port: waits (up to 10 s) until that fanout answers /readyz
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$1/readyz" >/dev/null && return; sleep 0.1; done
}
