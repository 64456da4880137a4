/* Load-to-use latency of this machine's memory by working-set size: a pointer chase through
 * one randomly ordered cycle over every cache line of a buffer, so each load waits for the one
 * before and no prefetcher can guess the next line. Where the latency jumps is the size of
 * per-key data a node can keep hot (see docs/profiling.md, thirteenth session).
 * Usage: bench/memlat.sh (compiles this with gcc and runs the sizes it lists). */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

#define LINE 64
#define HUGE_PAGE (2u << 20)

static char *volatile sink; /* keeps the chase from being optimised away */

static uint64_t next_random(uint64_t *state) { /* xorshift64 */
  uint64_t x = *state;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return *state = x;
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: memlat MEGABYTES...\n");
    return 2;
  }
  for (int arg = 1; arg < argc; arg++) {
    char *end;
    unsigned long megabytes = strtoul(argv[arg], &end, 10);
    if (*end != '\0' || megabytes == 0 || megabytes > (1ul << 20)) {
      fprintf(stderr, "not a size in MB (1 to 1048576): %s\n", argv[arg]);
      return 2;
    }
    size_t bytes = (size_t)megabytes << 20;
    size_t lines = bytes / LINE;
    size_t rounded = (bytes + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE;
    char *buffer = aligned_alloc(HUGE_PAGE, rounded);
    size_t *order = malloc(lines * sizeof *order);
    if (!buffer || !order) {
      fprintf(stderr, "cannot allocate %s MB\n", argv[arg]);
      return 1;
    }
    /* Huge pages where the kernel allows them, so that TLB misses do not count as cache misses. */
    madvise(buffer, rounded, MADV_HUGEPAGE);
    uint64_t seed = 0x9e3779b97f4a7c15u;
    for (size_t i = 0; i < lines; i++) order[i] = i;
    for (size_t i = lines - 1; i > 0; i--) { /* Fisher-Yates */
      size_t j = next_random(&seed) % (i + 1), t = order[i];
      order[i] = order[j];
      order[j] = t;
    }
    for (size_t i = 0; i < lines; i++)
      *(char **)(buffer + order[i] * LINE) = buffer + order[(i + 1) % lines] * LINE;
    char *p = buffer;
    for (size_t i = 0; i < lines; i++) p = *(char **)p; /* warm: every line touched once */
    const size_t loads = 20000000;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (size_t i = 0; i < loads; i++) p = *(char **)p;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double ns = ((double)(t1.tv_sec - t0.tv_sec) * 1e9 + (double)(t1.tv_nsec - t0.tv_nsec)) / loads;
    sink = p;
    printf("%6s MB  %6.1f ns per load\n", argv[arg], ns);
    free(order);
    free(buffer);
  }
  return 0;
}
