/* spin.h - the pause hint for the benchmarks' spin loops (trapload.c, responder.c). */
#ifndef BENCH_SPIN_H
#define BENCH_SPIN_H

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

#endif
