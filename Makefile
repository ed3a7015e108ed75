# lkvm: `make` builds build/lkvm and the guest images; `make test` runs every
# test tier; `make demo` boots the demo guest. Both install what is missing.

CXX      ?= g++
BUILD    ?= build
CXXFLAGS ?= -O2 -g
CXXFLAGS += -std=c++20 -Wall -Wextra -Werror -pthread -I. -MMD -MP
LDFLAGS  += -pthread
LDLIBS   += -laio -luring
ifeq ($(SAN),1)
BUILD    := build-san
# GCC 12's -Wmaybe-uninitialized misfires on std::variant moves under ASan instrumentation.
CXXFLAGS += -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined -Wno-maybe-uninitialized
LDFLAGS  += -fsanitize=address,undefined
endif

LIB_SRCS  := $(wildcard base/*.cc hw/*.cc hw/scsi/*.cc disk/*.cc virtio/*.cc) $(filter-out kvm/main.cc,$(wildcard kvm/*.cc))
LIB_OBJS  := $(LIB_SRCS:%.cc=$(BUILD)/obj/%.o)
UNIT_SRCS := $(wildcard tests/unit/*.cc)
UNIT_OBJS := $(UNIT_SRCS:%.cc=$(BUILD)/obj/%.o)
DEVICE_SRCS := $(wildcard tests/device/*.cc)
DEVICE_OBJS := $(DEVICE_SRCS:%.cc=$(BUILD)/obj/%.o)

# make test, demo and bench build with every CPU.
JOBS      ?= $(shell nproc)

LKVM      := $(BUILD)/lkvm
UNIT      := $(BUILD)/unit-tests
DEVICE    := $(BUILD)/device-tests
BLKBENCH  := $(BUILD)/blkbench
KERNEL    := build/kernel/vmlinuz
INITRD    := build/guest/initramfs.cpio.gz
INITRD_FIO := build/guest/initramfs-fio.cpio.gz

.PHONY: all deps guest test unit system demo bench clean uapi-check
all: $(LKVM) $(UNIT) $(DEVICE) $(BLKBENCH) guest $(if $(filter-out build,$(BUILD)),$(BUILD)/kernel $(BUILD)/guest)

# lkvm finds its default kernel and initramfs next to itself; other build
# directories (SAN=1) share the ones in build/.
$(BUILD)/kernel $(BUILD)/guest:
	@mkdir -p $(BUILD)
	ln -sfn ../build/$(notdir $@) $@

deps:
	@bash scripts/install-deps.sh

$(BUILD)/obj/%.o: %.cc
	@mkdir -p $(dir $@)
	$(CXX) $(CXXFLAGS) -c $< -o $@

$(BUILD)/liblkvm.a: $(LIB_OBJS)
	ar rcs $@ $^

$(LKVM): $(BUILD)/obj/kvm/main.o $(BUILD)/liblkvm.a
	$(CXX) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(UNIT): $(UNIT_OBJS) $(BUILD)/liblkvm.a
	$(CXX) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(DEVICE): $(DEVICE_OBJS) $(BUILD)/liblkvm.a
	$(CXX) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(BLKBENCH): $(BUILD)/obj/tests/bench/blkbench.o $(BUILD)/obj/tests/device/driver.o $(BUILD)/liblkvm.a
	$(CXX) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(KERNEL):
	@bash scripts/install-deps.sh

guest: $(INITRD) $(INITRD_FIO)
$(INITRD): guest/init guest/mkinitramfs.sh $(KERNEL)
	bash guest/mkinitramfs.sh
# The same plus fio, for I/O tests and benchmarks (-i build/guest/initramfs-fio.cpio.gz).
$(INITRD_FIO): guest/init guest/mkinitramfs.sh $(KERNEL)
	bash guest/mkinitramfs.sh --fio

# Everything, from a fresh Debian 12: dependencies, build, then every tier.
test: deps
	@$(MAKE) --no-print-directory -j$(JOBS) all
	@bash tests/run-all.sh $(BUILD)

system: all
	bash tests/system/run.sh

unit: $(UNIT)
	$(UNIT)

demo: deps
	@$(MAKE) --no-print-directory -j$(JOBS) all
	@bash scripts/demo.sh

# Benchmarks print tables; nothing in them is asserted.
bench: deps
	@$(MAKE) --no-print-directory -j$(JOBS) all
	@bash scripts/bench.sh $(BUILD)

# make uapi-check UAPI=DIR: every translation unit of every binary through the
# compiler's front end, with the project's flags, against the kernel headers
# unpacked from a linux-libc-dev .deb into DIR instead of the installed ones
# (tests/uapi/run.sh does this for each Debian 12 version).
ALL_SRCS := $(LIB_SRCS) kvm/main.cc $(UNIT_SRCS) $(DEVICE_SRCS) tests/bench/blkbench.cc
ifdef UAPI
UAPI_CHECKED := $(ALL_SRCS:%.cc=$(UAPI)/checked/%.ok)
UAPI_FLAGS   := -isystem $(UAPI)/usr/include/$(shell $(CXX) -print-multiarch) -isystem $(UAPI)/usr/include
uapi-check: $(UAPI_CHECKED)
$(UAPI)/checked/%.ok: %.cc
	@mkdir -p $(dir $@)
	$(CXX) $(filter-out -MMD -MP,$(CXXFLAGS)) $(UAPI_FLAGS) -fsyntax-only -MMD -MP -MF $@.d -MT $@ $<
	@touch $@
-include $(UAPI_CHECKED:=.d)
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
	ar rcs $@ $^

$(FUZZ_BUILD)/fuzz_%: $(FUZZ_BUILD)/obj/tests/fuzz/fuzz_%.o $(FUZZ_BUILD)/liblkvm.a
	$(FUZZ_CXX) -fsanitize=fuzzer $(FUZZ_SAN) -pthread -o $@ $^ $(LDLIBS)

clean:
	rm -rf build/obj build/lkvm build/unit-tests build/liblkvm.a build-san build-fuzz build/guest build/rig

-include $(FUZZ_LIB_OBJS:.o=.d) $(FUZZ_SRCS:tests/fuzz/%.cc=$(FUZZ_BUILD)/obj/tests/fuzz/%.d)
-include $(LIB_OBJS:.o=.d) $(UNIT_OBJS:.o=.d) $(DEVICE_OBJS:.o=.d) $(BUILD)/obj/tests/bench/blkbench.d $(BUILD)/obj/kvm/main.d
