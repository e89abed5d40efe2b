# Two commands do all set-up on a fresh Debian machine: `make demo` and `make test`.
SWIFT ?= swift
BUILD_FLAGS ?=

.PHONY: deps build test demo bench bench-syncvm clean

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

# syncvm: page hashing vs memcpy, and syncs of a 1 GiB image (benchmarks/README.md).
bench-syncvm: deps
	SWIFT="$(SWIFT)" ./benchmarks/syncvm/run.sh

clean:
	rm -rf .build
