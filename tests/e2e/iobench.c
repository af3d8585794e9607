/* Guest-side I/O benchmark for the vhost-user-blk comparison (bench/guest-io.sh): O_DIRECT
 * sequential reads and writes in 1 MiB blocks, random 4 KiB reads and writes at offsets from a
 * fixed-seed generator, all within the first SPAN bytes of the device; writes end with fsync.
 * Prints "VDISK-BENCH <test> <MB/s or IOPS> <seconds>" lines. Built static into the initramfs.
 * Usage: iobench DEVICE */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define SPAN (128ULL << 20)
#define SEQ_BLOCK (1 << 20)
#define RAND_BLOCK 4096
#define RAND_OPS 3000

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static uint64_t state = 0x9e3779b97f4a7c15ULL;
static uint64_t next(void) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    int fd = open(argv[1], O_RDWR | O_DIRECT);
    if (fd < 0) { perror("open"); return 1; }
    char *buf;
    if (posix_memalign((void **)&buf, 4096, SEQ_BLOCK)) return 1;
    for (int i = 0; i < SEQ_BLOCK; i++) buf[i] = (char)(i * 7);
    double t = now();
    for (uint64_t off = 0; off < SPAN; off += SEQ_BLOCK)
        if (pwrite(fd, buf, SEQ_BLOCK, off) != SEQ_BLOCK) { perror("pwrite"); return 1; }
    double unsynced = now() - t;
    if (fsync(fd)) { perror("fsync"); return 1; }
    t = now() - t;
    printf("VDISK-BENCH seq-write-unsynced-MBps %.1f %.3f\n", SPAN / 1048576.0 / unsynced, unsynced);
    printf("VDISK-BENCH seq-write-MBps %.1f %.3f\n", SPAN / 1048576.0 / t, t);
    t = now();
    for (uint64_t off = 0; off < SPAN; off += SEQ_BLOCK)
        if (pread(fd, buf, SEQ_BLOCK, off) != SEQ_BLOCK) { perror("pread"); return 1; }
    t = now() - t;
    printf("VDISK-BENCH seq-read-MBps %.1f %.3f\n", SPAN / 1048576.0 / t, t);
    t = now();
    for (int i = 0; i < RAND_OPS; i++) {
        uint64_t off = (next() % (SPAN / RAND_BLOCK)) * RAND_BLOCK;
        if (pwrite(fd, buf, RAND_BLOCK, off) != RAND_BLOCK) { perror("pwrite"); return 1; }
    }
    if (fsync(fd)) { perror("fsync"); return 1; }
    t = now() - t;
    printf("VDISK-BENCH rand-write-IOPS %.0f %.3f\n", RAND_OPS / t, t);
    t = now();
    for (int i = 0; i < RAND_OPS; i++) {
        uint64_t off = (next() % (SPAN / RAND_BLOCK)) * RAND_BLOCK;
        if (pread(fd, buf, RAND_BLOCK, off) != RAND_BLOCK) { perror("pread"); return 1; }
    }
    t = now() - t;
    printf("VDISK-BENCH rand-read-IOPS %.0f %.3f\n", RAND_OPS / t, t);
    fflush(stdout);
    return 0;
}
