/*
 * Declarations from libkrun's public header, kept to check the cffi binding (vmm/engines/libkrun_ffi.py).
 *
 * Source: https://github.com/containers/libkrun, path include/libkrun.h,
 *         commit 00903dbbdc93d08b9840a3eda0ac6007e5e09579 (libkrun 1.x, ABI/soname libkrun.so.1;
 *         the copy read carries no release tag, so the commit is the version).
 * Extract: only the declarations and constants the engine uses, with the header's own spelling and
 *          layout (parameter names, line breaks); the documentation comments are left out.
 * License of the source: Apache-2.0.
 */
#ifndef _LIBKRUN_H
#define _LIBKRUN_H

#include <inttypes.h>
#include <stddef.h>
#include <stdbool.h>
#include <unistd.h>

int32_t krun_set_log_level(uint32_t level);

#define KRUN_LOG_LEVEL_OFF 0
#define KRUN_LOG_LEVEL_ERROR 1
#define KRUN_LOG_LEVEL_WARN 2
#define KRUN_LOG_LEVEL_INFO 3
#define KRUN_LOG_LEVEL_DEBUG 4
#define KRUN_LOG_LEVEL_TRACE 5

int32_t krun_create_ctx();

int32_t krun_free_ctx(uint32_t ctx_id);

int32_t krun_set_vm_config(uint32_t ctx_id, uint8_t num_vcpus, uint32_t ram_mib);

#define KRUN_DISK_FORMAT_RAW 0
#define KRUN_DISK_FORMAT_QCOW2 1

int32_t krun_add_disk2(uint32_t ctx_id,
                       const char *block_id,
                       const char *disk_path,
                       uint32_t disk_format,
                       bool read_only);

int32_t krun_add_virtiofs(uint32_t ctx_id,
                          const char *c_tag,
                          const char *c_path);

int32_t krun_add_virtiofs3(uint32_t ctx_id,
                           const char *c_tag,
                           const char *c_path,
                           uint64_t shm_size,
                           bool read_only);

#define NET_FEATURE_CSUM 1 << 0
#define NET_FEATURE_GUEST_CSUM 1 << 1
#define NET_FEATURE_GUEST_TSO4 1 << 7
#define NET_FEATURE_GUEST_TSO6 1 << 8
#define NET_FEATURE_GUEST_UFO 1 << 10
#define NET_FEATURE_HOST_TSO4 1 << 11
#define NET_FEATURE_HOST_TSO6 1 << 12
#define NET_FEATURE_HOST_UFO 1 << 14

#define COMPAT_NET_FEATURES NET_FEATURE_CSUM | NET_FEATURE_GUEST_CSUM | \
                            NET_FEATURE_GUEST_TSO4 | NET_FEATURE_GUEST_UFO | \
                            NET_FEATURE_HOST_TSO4 | NET_FEATURE_HOST_UFO

int32_t krun_add_net_unixstream(uint32_t ctx_id,
                                const char *c_path,
                                int fd,
                                uint8_t *const c_mac,
                                uint32_t features,
                                uint32_t flags);

#define KRUN_KERNEL_FORMAT_RAW 0
#define KRUN_KERNEL_FORMAT_ELF 1

int32_t krun_set_kernel(uint32_t ctx_id,
                        const char *kernel_path,
                        uint32_t kernel_format,
                        const char *initramfs,
                        const char *cmdline);

int32_t krun_add_vsock_port2(uint32_t ctx_id,
                             uint32_t port,
                             const char *c_filepath,
                             bool listen);

int32_t krun_set_console_output(uint32_t ctx_id, const char *c_filepath);

int32_t krun_start_enter(uint32_t ctx_id);

#endif // _LIBKRUN_H
