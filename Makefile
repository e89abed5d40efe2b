# Two commands do all set-up on a fresh Debian machine: `make demo` and `make test`.
SWIFT ?= swift
BUILD_FLAGS ?=

.PHONY: deps build test demo bench bench-stable-log clean

deps:
	./scripts/install-deps.sh

build: deps
	$(SWIFT) build $(BUILD_FLAGS)

# Everything: unit, scenario, simulator (>= 1,000 seeds) and end-to-end tests.
test: deps
	$(SWIFT) build $(BUILD_FLAGS)
	$(SWIFT) test $(BUILD_FLAGS)

demo: build
	$(SWIFT) run $(BUILD_FLAGS) plover demo

# Stable log group commit vs one fsync per record (benchmarks/stable-log/README.md), ~1 min.
bench-stable-log: deps
	$(SWIFT) build -c release --product plover
	.build/release/plover bench stable-log --out benchmarks/stable-log/results.md

clean:
	rm -rf .build
