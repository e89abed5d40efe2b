# Two commands do all set-up on a fresh Debian machine: `make demo` and `make test`.
SWIFT ?= swift
BUILD_FLAGS ?=

.PHONY: deps build test test-example test-rdma check-docs docs demo simulate simulate-campaign bench-stable-log bench-consensus bench-syncvm bench-interpose bench-vm bench-vm-disk bench-vm-failover bench-soak bench-soak-memory bench-stop-gap bench-failover clean

deps:
	./scripts/install-deps.sh

build: deps
	$(SWIFT) build $(BUILD_FLAGS)

SIM_SEEDS ?= 1000

# Everything: unit, scenario, simulator (>= 1,000 seeds) and end-to-end tests.
test: deps check-docs
	$(SWIFT) build $(BUILD_FLAGS)
	# One test at a time: several suites block threads on purpose (real processes, disks,
	# hashing pools), and on a 2-core machine they would starve the async tests beside them.
	$(SWIFT) test $(BUILD_FLAGS) --no-parallel
	$(SWIFT) run $(BUILD_FLAGS) plover simulate --seed 1 --seeds $(SIM_SEEDS)
	$(MAKE) test-example

# The service author's example (Examples/replicated-counter): a package of its own that depends on
# this one by path, built and tested in its own .build (from clean on 2 cores: ~105 s to build,
# ~25 s to test).
test-example:
	cd Examples/replicated-counter && $(SWIFT) build $(BUILD_FLAGS) && $(SWIFT) test $(BUILD_FLAGS) --no-parallel

# Every public declaration of the libraries has a doc comment (scripts/check-doc-comments.py), and
# the articles' Swift blocks are the example's code (scripts/check-doc-snippets.py).
check-docs:
	python3 scripts/check-doc-comments.py Sources/RDMAPaxos Sources/RDMAPaxosCore Sources/RDMAPaxosSimulation Sources/PloverCheck Sources/VMReplica Sources/PloverTesting
	python3 scripts/check-doc-snippets.py Sources/RDMAPaxos/RDMAPaxos.docc/*.md

# The RDMAPaxos documentation (DocC catalog Sources/RDMAPaxos/RDMAPaxos.docc), warnings as errors;
# the archive lands in .build/plugins/Swift-DocC/outputs/RDMAPaxos.doccarchive.
docs:
	PLOVER_DOCS=1 $(SWIFT) package generate-documentation --target RDMAPaxos --warnings-as-errors

# On an RDMA machine: the verbs, fabric, ring and syncvm-link suites, whose shared tests gain cases
# on the real device (and rdma_cm cases with PLOVER_RDMA_ADDRESS=<IPv4 of the device's interface>;
# pick a device with PLOVER_RDMA_DEVICE), plus the connect-path, memlock and doctor checks. Where
# ibv_get_device_list finds nothing the hardware cases are skipped and say why. The runbook:
# docs/operations.md, "Running the hardware suite".
test-rdma: deps
	$(SWIFT) build $(BUILD_FLAGS)
	$(SWIFT) run $(BUILD_FLAGS) plover doctor
	$(SWIFT) test $(BUILD_FLAGS) --no-parallel --filter 'Verbs|Fabric|Ring|QueuePair|Sync|OutOfBand|ConnectRequest|SoftDevice|Memlock|Doctor'

# A long simulator campaign: make simulate SEED=100000 SEEDS=100000
SEED ?= 1
SEEDS ?= 10000
simulate:
	$(SWIFT) run -c release plover simulate --seed $(SEED) --seeds $(SEEDS)

# The >= 100,000-seed campaign docs/reliability.md records: one release build, then the seeds
# from CAMPAIGN_SEED in parts of CAMPAIGN_PART, each part timed (the rate is seeds / seconds).
# Stops at the first failing part, which prints the seed to replay.
CAMPAIGN_SEED ?= 1
CAMPAIGN_SEEDS ?= 100000
CAMPAIGN_PART ?= 10000
simulate-campaign:
	$(SWIFT) build -c release --product plover
	@set -e; s=$(CAMPAIGN_SEED); end=$$(( $(CAMPAIGN_SEED) + $(CAMPAIGN_SEEDS) )); \
	echo "commit $$(git rev-parse HEAD)"; \
	while [ $$s -lt $$end ]; do \
	  n=$$(( end - s < $(CAMPAIGN_PART) ? end - s : $(CAMPAIGN_PART) )); \
	  t0=$$(date +%s); \
	  $$($(SWIFT) build -c release --show-bin-path)/plover simulate --seed $$s --seeds $$n; \
	  echo "part $$s..$$(( s + n - 1 )): $$(( $$(date +%s) - t0 )) s"; \
	  s=$$(( s + n )); \
	done

demo: build
	$(SWIFT) run $(BUILD_FLAGS) plover demo

# Stable log group commit vs one fsync per record (benchmarks/stable-log/README.md), ~1 min.
bench-stable-log: deps
	$(SWIFT) build -c release --product plover
	.build/release/plover bench stable-log --out benchmarks/stable-log/results.md

# plover (fsync, memory) vs a 3-member etcd 3.4 cluster, all on loopback, same closed-loop
# client; plus one loopback round trip (benchmarks/consensus/README.md), ~4 min.
bench-consensus:
	./scripts/install-deps.sh etcd-server etcd-client
	$(SWIFT) build -c release --product plover
	.build/release/plover bench consensus --out benchmarks/consensus/results.md --svg benchmarks/consensus/consensus.svg

# syncvm: page hashing vs memcpy, and syncs of a 1 GiB image (benchmarks/README.md).
bench-syncvm: deps
	SWIFT="$(SWIFT)" ./benchmarks/syncvm/run.sh

# Redis replicated by libinterpose.so (3 replicas, LD_PRELOAD) vs plain Redis, redis-benchmark
# SET/GET/INCR/LPUSH at 50 clients (-P 1 and 16), 4 KiB SET, 1 client, with CPU per request and the
# machine's CPU ceiling (benchmarks/interpose/README.md), ~6 min.
bench-interpose: deps
	$(SWIFT) build -c release --product interpose
	./benchmarks/interpose/run.py

# VM replication with QEMU under TCG (benchmarks/vm/README.md), a few minutes; then redis-server
# in the guest over the tap attachment (benchmarks/vm-tap/README.md, needs root), about a minute;
# then bytes and pause per checkpoint under redis-benchmark SET (benchmarks/vm-bytes/README.md,
# needs root), about eleven minutes for both runs.
VM_REQUESTS ?= 40
bench-vm: deps
	$(SWIFT) build -c release --product plover
	.build/release/plover bench vm --requests $(VM_REQUESTS) --out benchmarks/vm/results.md
	python3 benchmarks/vm/plot.py benchmarks/vm/results.md benchmarks/vm/vm.svg
	.build/release/plover bench vm-tap --requests 40 --clients 1,16 --kills 5 --out benchmarks/vm-tap/results.md
	python3 benchmarks/vm-tap/plot.py benchmarks/vm-tap/results.md benchmarks/vm-tap/vm-tap.svg
	.build/release/plover bench vm-bytes --runs 16x1:3200,16x16:10240,1x1:240 --out benchmarks/vm-bytes/results.md
	python3 benchmarks/vm-bytes/plot.py benchmarks/vm-bytes/results.md benchmarks/vm-bytes/vm-bytes.svg
	.build/release/plover bench vm-bytes --runs 16x1:3200,1x1:240 --redis-config "hz 1" --out benchmarks/vm-bytes/results-hz1.md

bench-vm-disk: deps
	$(SWIFT) build -c release --product plover
	.build/release/plover bench vm --disk-mb 64 --gaps 0 --requests $(VM_REQUESTS) --out benchmarks/vm-disk/results.md

# VM failover under load: ten kill -9s of the primary with 16 clients writing
# (benchmarks/vm-failover/README.md), a few minutes.
bench-vm-failover: deps
	$(SWIFT) build -c release --product plover
	.build/release/plover bench vm-failover --kills 10 --clients 16 --resend-ms 100 --settle-seconds 60 --out benchmarks/vm-failover/results.md

# Leader kill -9 under load, default vs fast timing: unavailability window, lost writes, spurious
# elections in 5 minutes without faults (benchmarks/failover/README.md), ~15 min.
bench-failover: deps
	$(SWIFT) build -c release --product plover
	.build/release/plover bench failover --out benchmarks/failover/results.md

# SIGTERM vs SIGKILL of the leader under load: the write gap (benchmarks/stop-gap/README.md).
bench-stop-gap:
	$(SWIFT) build -c release --product plover
	.build/release/plover bench stop-gap --out benchmarks/stop-gap/results.md

# Ten minutes of 16 clients writing 4 KiB values with fsync on one cluster: throughput, p99,
# leader changes, RSS and disk over time (benchmarks/soak/README.md).
SOAK_SECONDS ?= 600
bench-soak: deps
	$(SWIFT) build -c release --product plover
	.build/release/plover bench soak --seconds $(SOAK_SECONDS) --out benchmarks/soak/results.md
	python3 benchmarks/soak/plot.py benchmarks/soak/results.md benchmarks/soak/soak.svg

# The same soak with memory logs: memory must stay below memory_log_bytes_max for the whole run.
bench-soak-memory: deps
	$(SWIFT) build -c release --product plover
	.build/release/plover bench soak --durability memory --seconds $(SOAK_SECONDS) --out benchmarks/soak/results-memory.md
	python3 benchmarks/soak/plot.py benchmarks/soak/results-memory.md benchmarks/soak/soak-memory.svg

clean:
	rm -rf .build
