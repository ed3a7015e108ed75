# lkvm: `make` builds build/lkvm and the guest images; `make test` runs every
# test tier; `make demo` boots the demo guest. Both install what is missing.

# Every CPU by default; a -j on the command line wins (make -j2). Only at the
# top: the inner makes of test, demo and bench inherit the top's jobs (its
# -j here would override a -j1 they are given).
JOBS     ?= $(shell nproc)
ifeq ($(MAKELEVEL),0)
MAKEFLAGS += -j$(JOBS)
endif

CXX      ?= g++
BUILD    ?= build
CXXFLAGS ?= -O2 -g
CXXFLAGS += -std=c++20 -Wall -Wextra -Werror -pthread -I. -MMD -MP
LDFLAGS  += -pthread
LDLIBS   += -laio -luring

# The g++ sanitizer trees: build-san/ (ASan + UBSan) and build-tsan/
# (ThreadSanitizer). Plain `make test` builds build-tsan's unit-tests and
# device-tests and runs those two tiers there (its ASan+UBSan tiers use clang's
# fuzz tree instead: FUZZ_BUILD below); `make test SAN=1` (or TSAN=1) makes
# that tree the one every target builds and runs every tier against it. The
# library is compiled at -O1 there and the tests at -O0: doctest's expanded
# checks under instrumentation took GCC minutes per file at -O1/-O2
# (tests/unit/test_scsi.cc: 98 s of CPU under ASan+UBSan at -O1, 14 s at -O0),
# and the code under test keeps -O1.
# GCC 12's -Wmaybe-uninitialized misfires on std::variant moves under ASan instrumentation.
TREE_CXXFLAGS_build-san  := -O1 -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined -Wno-maybe-uninitialized
TREE_LDFLAGS_build-san   := -fsanitize=address,undefined
# -Wno-tsan: GCC warns that TSan does not model std::atomic_thread_fence. Ours
# (virtqueue.cc, io_engine.cc, the test driver) are seq_cst store->load fences
# of notification suppression, which keep a wakeup from being lost; what they
# publish is handed over by release/acquire atomics, which TSan does see.
TREE_CXXFLAGS_build-tsan := -O1 -fsanitize=thread -Wno-tsan
TREE_LDFLAGS_build-tsan  := -fsanitize=thread
TREE_TESTFLAGS_build-san  := -O0
TREE_TESTFLAGS_build-tsan := -O0
# The main tree's tests too: doctest's checks cost the compiler most of the
# build at -O2 (test_scsi.cc: 43 CPU s, 5 at -O0), and what they test is
# compiled at -O2. The test guest driver stays optimized: blkbench measures
# through it, and the device tests drive load with it.
TREE_TESTFLAGS_build      := -O0
build/obj/tests/device/driver.o build/obj/tests/bench/blkbench.o: TREE_TESTFLAGS_build :=
ifeq ($(SAN),1)
BUILD    := build-san
endif
ifeq ($(TSAN),1)
BUILD    := build-tsan
endif
SAN_TESTS  := build-fuzz/unit-tests build-fuzz/device-tests
TSAN_TESTS := build-tsan/unit-tests build-tsan/device-tests

LIB_SRCS  := $(wildcard base/*.cc hw/*.cc hw/scsi/*.cc disk/*.cc virtio/*.cc kvm/*.cc api/*.cc) $(filter-out cli/main.cc,$(wildcard cli/*.cc))
UNIT_SRCS := $(wildcard tests/unit/*.cc)
DEVICE_SRCS := $(wildcard tests/device/*.cc)

LKVM      := $(BUILD)/lkvm
UNIT      := $(BUILD)/unit-tests
DEVICE    := $(BUILD)/device-tests
BLKBENCH  := $(BUILD)/blkbench
KERNEL    := build/kernel/vmlinuz
INITRD    := build/guest/initramfs.cpio.gz
INITRD_FIO := build/guest/initramfs-fio.cpio.gz
MAN_PAGE  := build/lkvm.1

.PHONY: all deps guest test unit system demo bench clean uapi-check install uninstall
# What the system tier runs: lkvm, and the guest's kernel and images.
SYSTEM_NEEDS := $(LKVM) guest $(if $(filter-out build,$(BUILD)),$(BUILD)/kernel $(BUILD)/guest)
all: $(SYSTEM_NEEDS) $(UNIT) $(DEVICE) $(BLKBENCH) $(MAN_PAGE)

# lkvm finds its default kernel and initramfs next to itself; other build
# directories (SAN=1) share the ones in build/.
$(BUILD)/kernel $(BUILD)/guest:
	@mkdir -p $(BUILD)
	ln -sfn ../build/$(notdir $@) $@

deps:
	@echo "==> dependencies: scripts/install-deps.sh installs what is missing (Debian packages, the guest kernel)"
	@bash scripts/install-deps.sh

# tree DIR: the object, library and binary rules of one build tree, with its
# own flags (TREE_*_DIR above; none for build/).
define tree
$(1)/obj/%.o: %.cc
	@mkdir -p $$(dir $$@)
	$$(CXX) $$(CXXFLAGS) $$(TREE_CXXFLAGS_$(1)) -c $$< -o $$@
$(1)/obj/tests/%.o: tests/%.cc
	@mkdir -p $$(dir $$@)
	$$(CXX) $$(CXXFLAGS) $$(TREE_CXXFLAGS_$(1)) $$(TREE_TESTFLAGS_$(1)) -c $$< -o $$@
# Made afresh: `ar r` would keep the members of sources that moved or went.
$(1)/liblkvm.a: $$(LIB_SRCS:%.cc=$(1)/obj/%.o)
	rm -f $$@ && ar rcs $$@ $$^
$(1)/lkvm: $(1)/obj/cli/main.o $(1)/liblkvm.a
	$$(CXX) $$(LDFLAGS) $$(TREE_LDFLAGS_$(1)) -o $$@ $$^ $$(LDLIBS)
$(1)/unit-tests: $$(UNIT_SRCS:%.cc=$(1)/obj/%.o) $(1)/liblkvm.a
	$$(CXX) $$(LDFLAGS) $$(TREE_LDFLAGS_$(1)) -o $$@ $$^ $$(LDLIBS)
$(1)/device-tests: $$(DEVICE_SRCS:%.cc=$(1)/obj/%.o) $(1)/liblkvm.a
	$$(CXX) $$(LDFLAGS) $$(TREE_LDFLAGS_$(1)) -o $$@ $$^ $$(LDLIBS)
$(1)/blkbench: $(1)/obj/tests/bench/blkbench.o $(1)/obj/tests/device/driver.o $(1)/liblkvm.a
	$$(CXX) $$(LDFLAGS) $$(TREE_LDFLAGS_$(1)) -o $$@ $$^ $$(LDLIBS)
-include $$(wildcard $(1)/obj/*/*.d $(1)/obj/*/*/*.d)
endef
TREES := $(sort $(BUILD) build-san build-tsan)
$(foreach t,$(TREES),$(eval $(call tree,$(t))))

$(KERNEL):
	@bash scripts/install-deps.sh

guest: $(INITRD) $(INITRD_FIO)
$(INITRD): guest/init guest/mkinitramfs.sh $(KERNEL)
	bash guest/mkinitramfs.sh
# The same plus fio, for I/O tests and benchmarks (-i build/guest/initramfs-fio.cpio.gz).
$(INITRD_FIO): guest/init guest/mkinitramfs.sh $(KERNEL)
	bash guest/mkinitramfs.sh --fio

# The man page's source is dist/lkvm.1.scd, in scdoc(5).
$(MAN_PAGE): dist/lkvm.1.scd
	@command -v scdoc > /dev/null || { echo "scdoc is missing: run scripts/install-deps.sh (Debian package scdoc)" >&2; exit 1; }
	@mkdir -p $(dir $@)
	scdoc < $< > $@

# make install [PREFIX=/usr/local] [DESTDIR=DIR]: lkvm, its default guest
# kernel and initramfs (PREFIX/share/lkvm/, where an installed lkvm looks for
# them), the man page and the bash completion. It installs what `make` built
# and builds nothing: a `sudo make install` that compiled would leave
# root-owned files in build/. The man page goes uncompressed, as upstream
# installs do; a Debian package's dh_compress gzips it.
PREFIX   ?= /usr/local
BINDIR   := $(DESTDIR)$(PREFIX)/bin
DATADIR  := $(DESTDIR)$(PREFIX)/share/lkvm
MAN1DIR  := $(DESTDIR)$(PREFIX)/share/man/man1
COMPDIR  := $(DESTDIR)$(PREFIX)/share/bash-completion/completions
COMPLETION := dist/lkvm.bash-completion
INSTALLED  := $(BINDIR)/lkvm $(DATADIR)/vmlinuz $(DATADIR)/initramfs.cpio.gz $(DATADIR)/initramfs-fio.cpio.gz \
              $(MAN1DIR)/lkvm.1 $(COMPDIR)/lkvm
install:
	@$(MAKE) --no-print-directory -q $(LKVM) $(KERNEL) $(INITRD) $(INITRD_FIO) $(MAN_PAGE) || \
	    { echo "make install: what it installs is not built or older than its sources: run 'make' (as yourself), then 'make install'" >&2; exit 1; }
	install -D -m 0755 $(LKVM) $(BINDIR)/lkvm
	install -D -m 0644 $(KERNEL) $(DATADIR)/vmlinuz
	install -D -m 0644 $(INITRD) $(DATADIR)/initramfs.cpio.gz
	install -D -m 0644 $(INITRD_FIO) $(DATADIR)/initramfs-fio.cpio.gz
	install -D -m 0644 $(MAN_PAGE) $(MAN1DIR)/lkvm.1
	install -D -m 0644 $(COMPLETION) $(COMPDIR)/lkvm

# Removes exactly what install put there, and share/lkvm once it is empty.
uninstall:
	rm -f $(INSTALLED)
	if [ -d $(DATADIR) ]; then rmdir --ignore-fail-on-non-empty $(DATADIR); fi

# Everything, from a fresh Debian 12: dependencies, build, then every tier.
# Plain `make test` (what CI runs) also builds the sanitizer trees' unit and
# device tests and the fuzz targets, in the same make, and runs those tiers:
# the unit and device tests under ASan+UBSan and under TSan, and every
# libFuzzer target for CI_FUZZ_SECONDS, all targets at once.
CI_FUZZ_SECONDS ?= 20
ifeq ($(BUILD),build)
TEST_EXTRA_GOALS := $(SAN_TESTS) $(TSAN_TESTS) fuzz-build
TEST_EXTRA_TIERS := --san build-fuzz --tsan build-tsan --fuzz $(CI_FUZZ_SECONDS)
endif
# The system tier starts as soon as what it needs is built; the rest is
# built beside it (tests/run-all.sh --build).
test: deps
	@echo "==> building lkvm and the guest images, then every test tree beside the tests (a few minutes the first time)"
	@$(MAKE) --no-print-directory $(SYSTEM_NEEDS)
	@echo "==> running every test tier (system tests boot guests, through the nested rig where this host has no hardware KVM)"
	@bash tests/run-all.sh $(BUILD) $(TEST_EXTRA_TIERS) --build '$(MAKE) --no-print-directory all $(TEST_EXTRA_GOALS)'

system: all
	bash tests/system/run.sh

unit: $(UNIT)
	$(UNIT)

demo: deps
	@echo "==> building lkvm and the guest images in parallel (a few minutes the first time)"
	@$(MAKE) --no-print-directory all
	@echo "==> booting the demo guest"
	@bash scripts/demo.sh

# Benchmarks print tables; nothing in them is asserted.
bench: deps
	@$(MAKE) --no-print-directory all
	@bash scripts/bench.sh $(BUILD)

# make uapi-check UAPI=DIR UAPI_BASE=DIR2: every translation unit of every
# binary, with the project's flags, against the kernel headers unpacked from a
# linux-libc-dev .deb into DIR instead of the installed ones (tests/uapi/run.sh
# does this for each Debian 12 version). Each is preprocessed first; one whose
# preprocessed text is the same as against the installed headers (its hash in
# DIR2, kept across versions) is the same input to the compiler, which the
# build itself just compiled, so only the others go through the front end
# (-fsyntax-only, -Werror). A DIR/checked/*.ok file says which of the two it was.
ALL_SRCS := $(LIB_SRCS) cli/main.cc $(UNIT_SRCS) $(DEVICE_SRCS) tests/bench/blkbench.cc
ifdef UAPI
UAPI_BASE    ?= $(BUILD)/uapi/installed
UAPI_CHECKED := $(ALL_SRCS:%.cc=$(UAPI)/checked/%.ok)
UAPI_FLAGS   := -isystem $(UAPI)/usr/include/$(shell $(CXX) -print-multiarch) -isystem $(UAPI)/usr/include
UAPI_CXXFLAGS := $(filter-out -MMD -MP,$(CXXFLAGS))
uapi-check: $(UAPI_CHECKED)
# -MD, not -MMD: the installed headers are what this depends on.
$(UAPI_BASE)/%.sha: %.cc
	@mkdir -p $(dir $@)
	$(CXX) $(UAPI_CXXFLAGS) -E -P -MD -MP -MF $@.d -MT $@ $< -o $@.i
	sha256sum < $@.i > $@ && rm -f $@.i
$(UAPI)/checked/%.ok: %.cc $(UAPI_BASE)/%.sha
	@mkdir -p $(dir $@)
	$(CXX) $(UAPI_CXXFLAGS) $(UAPI_FLAGS) -E -P -MMD -MP -MF $@.d -MT $@ $< -o $@.i
	sha256sum < $@.i > $@.sha && rm -f $@.i
	if cmp -s $@.sha $(UAPI_BASE)/$*.sha; then echo same > $@.tmp; \
	else $(CXX) $(UAPI_CXXFLAGS) $(UAPI_FLAGS) -fsyntax-only $< && echo compiled > $@.tmp; fi
	@rm -f $@.sha && mv $@.tmp $@
-include $(UAPI_CHECKED:=.d) $(ALL_SRCS:%.cc=$(UAPI_BASE)/%.sha.d)
endif

# make fuzz [FUZZ_SECONDS=N]: the libFuzzer targets (tests/fuzz/fuzz_*.cc),
# built with clang under ASan and UBSan in build-fuzz/ against the library
# compiled there by clang, each run for N seconds in turn (scripts/fuzz.sh).
# Nothing here touches the g++ build above.
FUZZ_SECONDS  ?= 60
FUZZ_BUILD    := build-fuzz
FUZZ_CXX      ?= clang++
FUZZ_SAN      := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
# The library gets coverage instrumentation without libFuzzer's main; only the targets link it.
FUZZ_CXXFLAGS := -O1 -g -std=c++20 -Wall -Wextra -Werror -pthread -I. -MMD -MP $(FUZZ_SAN)
FUZZ_LIB_OBJS := $(LIB_SRCS:%.cc=$(FUZZ_BUILD)/obj/%.o)
FUZZ_SRCS     := $(wildcard tests/fuzz/fuzz_*.cc)
FUZZ_TARGETS  := $(FUZZ_SRCS:tests/fuzz/%.cc=$(FUZZ_BUILD)/%)

.PHONY: fuzz fuzz-build
fuzz:
	@bash scripts/fuzz.sh $(FUZZ_SECONDS)
fuzz-build: $(FUZZ_TARGETS)
# Kept, so that a rebuild after a library change compiles no target again.
.SECONDARY: $(FUZZ_SRCS:tests/fuzz/%.cc=$(FUZZ_BUILD)/obj/tests/fuzz/%.o)

$(FUZZ_BUILD)/obj/%.o: %.cc
	@mkdir -p $(dir $@)
	$(FUZZ_CXX) $(FUZZ_CXXFLAGS) -fsanitize=fuzzer-no-link -c $< -o $@

$(FUZZ_BUILD)/liblkvm.a: $(FUZZ_LIB_OBJS)
	rm -f $@ && ar rcs $@ $^

$(FUZZ_BUILD)/fuzz_%: $(FUZZ_BUILD)/obj/tests/fuzz/fuzz_%.o $(FUZZ_BUILD)/liblkvm.a
	$(FUZZ_CXX) -fsanitize=fuzzer $(FUZZ_SAN) -pthread -o $@ $^ $(LDLIBS)

# make test's ASan+UBSan tier: the unit and device tests built by clang (-O0,
# no coverage) and linked with this clang ASan+UBSan library, which the fuzz
# targets need anyway (its coverage hooks fall back to the sanitizer runtime's
# defaults without libFuzzer). A g++ tree of its own (build-san/) cost about
# 300 s of CPU more; `make test SAN=1` still builds and runs that one.
$(FUZZ_BUILD)/obj/tests/unit/%.o: tests/unit/%.cc
	@mkdir -p $(dir $@)
	$(FUZZ_CXX) $(FUZZ_CXXFLAGS) -O0 -c $< -o $@
$(FUZZ_BUILD)/obj/tests/device/%.o: tests/device/%.cc
	@mkdir -p $(dir $@)
	$(FUZZ_CXX) $(FUZZ_CXXFLAGS) -O0 -c $< -o $@
$(FUZZ_BUILD)/unit-tests: $(UNIT_SRCS:%.cc=$(FUZZ_BUILD)/obj/%.o) $(FUZZ_BUILD)/liblkvm.a
	$(FUZZ_CXX) $(FUZZ_SAN) -pthread -o $@ $^ $(LDLIBS)
$(FUZZ_BUILD)/device-tests: $(DEVICE_SRCS:%.cc=$(FUZZ_BUILD)/obj/%.o) $(FUZZ_BUILD)/liblkvm.a
	$(FUZZ_CXX) $(FUZZ_SAN) -pthread -o $@ $^ $(LDLIBS)

clean:
	rm -rf build/obj build/lkvm build/lkvm.1 build/unit-tests build/device-tests build/blkbench build/liblkvm.a build-san build-tsan build-fuzz build/guest build/rig

-include $(FUZZ_LIB_OBJS:.o=.d) $(FUZZ_SRCS:tests/fuzz/%.cc=$(FUZZ_BUILD)/obj/tests/fuzz/%.d) $(wildcard $(FUZZ_BUILD)/obj/tests/*/*.d)
