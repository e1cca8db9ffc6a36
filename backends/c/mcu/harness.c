/*
 * Semihosted test program for edgeopt's MCU runs (QEMU mps2-an386, newlib rdimon stdio).
 *
 * Reads the whole input file, calls the program under test
 *
 *     int eo_test_run(const void *in, size_t in_bytes, void *out, size_t out_bytes);
 *
 * which returns the number of output bytes it wrote (0..out_bytes) or a negative status, writes
 * those bytes to the output file and the virtual-timer ticks spent inside eo_test_run to the
 * stats file. Files live in QEMU's working directory on the host. main() returns 0 on success and
 * one of the EO_HARNESS_* codes below otherwise, after a one-line message on stderr.
 *
 * Compile-time settings: EO_HARNESS_INPUT, EO_HARNESS_OUTPUT, EO_HARNESS_STATS (file names) and
 * EO_HARNESS_OUT_MAX (capacity of the output buffer, bytes). Buffers come from the heap, so the
 * image's .data/.bss hold only the code under test (and newlib's own state).
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#ifndef EO_HARNESS_INPUT
#define EO_HARNESS_INPUT "eo_in.bin"
#endif
#ifndef EO_HARNESS_OUTPUT
#define EO_HARNESS_OUTPUT "eo_out.bin"
#endif
#ifndef EO_HARNESS_STATS
#define EO_HARNESS_STATS "eo_stats.txt"
#endif
#ifndef EO_HARNESS_OUT_MAX
#define EO_HARNESS_OUT_MAX (256u * 1024u)
#endif

enum {
    EO_HARNESS_OK = 0,
    EO_HARNESS_INPUT_ERROR = 10,
    EO_HARNESS_OUTPUT_ERROR = 11,
    EO_HARNESS_NO_MEMORY = 12,
    EO_HARNESS_RUN_ERROR = 13,
};

int eo_test_run(const void *in, size_t in_bytes, void *out, size_t out_bytes);
uint32_t eo_mcu_ticks(void); /* startup.c */

static int eo_fail(int code, const char *what, const char *path)
{
    fprintf(stderr, "edgeopt-mcu harness: %s: %s\n", what, path);
    return code;
}

/* The whole file in a heap buffer (at least 1 byte), or NULL. */
static void *eo_read_file(const char *path, size_t *n_bytes)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return NULL;
    long n = -1;
    if (fseek(f, 0, SEEK_END) == 0)
        n = ftell(f);
    unsigned char *buf = NULL;
    if (n >= 0 && fseek(f, 0, SEEK_SET) == 0)
        buf = malloc((size_t)n + 1u);
    if (buf != NULL && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    *n_bytes = (size_t)n;
    return buf;
}

static int eo_write_file(const char *path, const void *data, size_t n_bytes)
{
    FILE *f = fopen(path, "wb");
    if (f == NULL)
        return -1;
    int ok = fwrite(data, 1, n_bytes, f) == n_bytes;
    return (fclose(f) == 0 && ok) ? 0 : -1;
}

int main(void)
{
    size_t in_bytes = 0;
    void *in = eo_read_file(EO_HARNESS_INPUT, &in_bytes);
    if (in == NULL)
        return eo_fail(EO_HARNESS_INPUT_ERROR, "cannot read input file", EO_HARNESS_INPUT);
    void *out = malloc(EO_HARNESS_OUT_MAX);
    if (out == NULL)
        return eo_fail(EO_HARNESS_NO_MEMORY, "cannot allocate the output buffer", "heap");

    uint32_t t0 = eo_mcu_ticks();
    int written = eo_test_run(in, in_bytes, out, EO_HARNESS_OUT_MAX);
    uint32_t ticks = eo_mcu_ticks() - t0;

    if (written < 0 || (size_t)written > EO_HARNESS_OUT_MAX) {
        fprintf(stderr, "edgeopt-mcu harness: eo_test_run failed with status %d\n", written);
        return EO_HARNESS_RUN_ERROR;
    }
    if (eo_write_file(EO_HARNESS_OUTPUT, out, (size_t)written) != 0)
        return eo_fail(EO_HARNESS_OUTPUT_ERROR, "cannot write output file", EO_HARNESS_OUTPUT);
    FILE *stats = fopen(EO_HARNESS_STATS, "w");
    if (stats == NULL)
        return eo_fail(EO_HARNESS_OUTPUT_ERROR, "cannot write stats file", EO_HARNESS_STATS);
    fprintf(stats, "ticks=%lu\nin_bytes=%lu\nout_bytes=%d\n", (unsigned long)ticks,
            (unsigned long)in_bytes, written);
    if (fclose(stats) != 0)
        return eo_fail(EO_HARNESS_OUTPUT_ERROR, "cannot write stats file", EO_HARNESS_STATS);
    free(out);
    free(in);
    return EO_HARNESS_OK;
}
