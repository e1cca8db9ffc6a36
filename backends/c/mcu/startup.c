/*
 * Minimal Cortex-M4F start-up for QEMU's mps2-an386 board (edgeopt's MCU test harness).
 *
 * Reset: enable the FPU, copy .data from flash, zero .bss, start timer 0 (25 MHz), open the
 * semihosted stdio handles (newlib's rdimon), call main() and exit with its return value.
 *
 * Exit: `_exit` is ours (it replaces librdimon's): semihosting SYS_EXIT_EXTENDED with
 * ADP_Stopped_ApplicationExit and the status, so QEMU's own exit status is main's return value.
 * Plain SYS_EXIT on AArch32 carries no status (QEMU would report 0 for any return value).
 *
 * Faults: every exception other than reset lands in eo_fault_report(), which prints the
 * exception's name, the stacked pc/lr and the fault status registers on the semihosting console
 * and exits with status EO_FAULT_EXIT_BASE + exception number (HardFault: 243). Handlers are weak
 * aliases, so a test program can override any of them.
 *
 * Linker-script symbols used: _estack, _sidata, _sdata, _edata, _sbss, _ebss, __heap_end.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#define EO_FAULT_EXIT_BASE 240u
#define EO_NUM_IRQ 32 /* external interrupts wired on mps2-an386 (EO_IRQ32 below) */

/* Semihosting operations (Arm "Semihosting for AArch32 and AArch64", v2.0). */
#define SYS_WRITE0 0x04
#define SYS_EXIT 0x18
#define SYS_EXIT_EXTENDED 0x20
#define ADP_Stopped_ApplicationExit 0x20026u
#define ADP_Stopped_RunTimeErrorUnknown 0x20023u

/* System control block registers. */
#define SCB_CPACR (*(volatile uint32_t *)0xE000ED88u)
#define SCB_CFSR (*(volatile uint32_t *)0xE000ED28u)
#define SCB_HFSR (*(volatile uint32_t *)0xE000ED2Cu)
#define SCB_MMFAR (*(volatile uint32_t *)0xE000ED34u)
#define SCB_BFAR (*(volatile uint32_t *)0xE000ED38u)

/* CMSDK APB timer 0 of the MPS2 FPGA images: a 32-bit down counter clocked at 25 MHz. */
#define EO_TIMER0_CTRL (*(volatile uint32_t *)0x40000000u)
#define EO_TIMER0_VALUE (*(volatile uint32_t *)0x40000004u)
#define EO_TIMER0_RELOAD (*(volatile uint32_t *)0x40000008u)

extern uint32_t _estack;
extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss;
extern char __heap_end;
extern unsigned int __heap_limit; /* librdimon's _sbrk will not grow the heap past it */

extern void initialise_monitor_handles(void);
extern void __libc_init_array(void);
extern int main(void);

void Reset_Handler(void) __attribute__((noreturn));
void _exit(int status) __attribute__((noreturn));
void eo_fault_report(const uint32_t *frame, uint32_t exc_return)
    __attribute__((noreturn, used));
uint32_t eo_mcu_ticks(void);
void _init(void);
void _fini(void);

static int eo_semihost(int op, const void *arg)
{
    register int r0 __asm__("r0") = op;
    register const void *r1 __asm__("r1") = arg;
    __asm__ volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}

void _exit(int status)
{
    const uint32_t block[2] = {ADP_Stopped_ApplicationExit, (uint32_t)status};
    eo_semihost(SYS_EXIT_EXTENDED, block);
    /* Only reached on a host without SYS_EXIT_EXTENDED: report success or failure. */
    eo_semihost(SYS_EXIT, (const void *)(uintptr_t)(status == 0 ? ADP_Stopped_ApplicationExit
                                                                : ADP_Stopped_RunTimeErrorUnknown));
    for (;;) {
    }
}

/* Timer ticks (25 MHz of virtual time) since reset; wraps after about 171 s. */
uint32_t eo_mcu_ticks(void)
{
    return 0xFFFFFFFFu - EO_TIMER0_VALUE;
}

/* newlib's __libc_init_array calls these; there is no crti.o in this image (-nostartfiles). */
void _init(void)
{
}

void _fini(void)
{
}

void Reset_Handler(void)
{
    SCB_CPACR |= 0xFu << 20; /* CP10 and CP11: full access to the FPU */
    __asm__ volatile("dsb\n\tisb" ::: "memory");

    uint32_t *src = &_sidata;
    for (uint32_t *dst = &_sdata; dst < &_edata;)
        *dst++ = *src++;
    for (uint32_t *dst = &_sbss; dst < &_ebss;)
        *dst++ = 0;

    EO_TIMER0_RELOAD = 0xFFFFFFFFu;
    EO_TIMER0_VALUE = 0xFFFFFFFFu;
    EO_TIMER0_CTRL = 1u;

    __heap_limit = (unsigned int)(uintptr_t)&__heap_end;
    initialise_monitor_handles();
    __libc_init_array();
    exit(main());
}

static char *eo_put_str(char *p, const char *s)
{
    while (*s)
        *p++ = *s++;
    return p;
}

static char *eo_put_hex(char *p, const char *label, uint32_t v)
{
    p = eo_put_str(p, label);
    p = eo_put_str(p, "0x");
    for (int shift = 28; shift >= 0; shift -= 4)
        *p++ = "0123456789abcdef"[(v >> shift) & 0xFu];
    return p;
}

static char *eo_put_dec(char *p, uint32_t v)
{
    char digits[10];
    int n = 0;
    do {
        digits[n++] = (char)('0' + v % 10u);
        v /= 10u;
    } while (v != 0u);
    while (n > 0)
        *p++ = digits[--n];
    return p;
}

static const char *eo_exception_name(uint32_t exc)
{
    static const char *const names[16] = {
        "Thread",     "Reset",    "NMI",      "HardFault", "MemManage", "BusFault",
        "UsageFault", "Reserved", "Reserved", "Reserved",  "Reserved",  "SVCall",
        "DebugMonitor", "Reserved", "PendSV", "SysTick"};
    return exc < 16 ? names[exc] : "IRQ";
}

/* The names of the set bits of CFSR (MemManage, BusFault, UsageFault status) and HFSR. */
static char *eo_put_fault_bits(char *p, uint32_t cfsr, uint32_t hfsr)
{
    static const struct {
        uint32_t bit;
        const char *name;
    } bits[] = {
        {1u << 0, " IACCVIOL"},  {1u << 1, " DACCVIOL"},    {1u << 3, " MUNSTKERR"},
        {1u << 4, " MSTKERR"},   {1u << 5, " MLSPERR"},     {1u << 8, " IBUSERR"},
        {1u << 9, " PRECISERR"}, {1u << 10, " IMPRECISERR"}, {1u << 11, " UNSTKERR"},
        {1u << 12, " STKERR"},   {1u << 13, " LSPERR"},     {1u << 16, " UNDEFINSTR"},
        {1u << 17, " INVSTATE"}, {1u << 18, " INVPC"},      {1u << 19, " NOCP"},
        {1u << 24, " UNALIGNED"}, {1u << 25, " DIVBYZERO"}};
    for (size_t i = 0; i < sizeof bits / sizeof bits[0]; i++)
        if (cfsr & bits[i].bit)
            p = eo_put_str(p, bits[i].name);
    if (hfsr & (1u << 30))
        p = eo_put_str(p, " FORCED");
    if (hfsr & (1u << 1))
        p = eo_put_str(p, " VECTTBL");
    return p;
}

void eo_fault_report(const uint32_t *frame, uint32_t exc_return)
{
    static char msg[400];
    uint32_t ipsr;
    __asm__ volatile("mrs %0, ipsr" : "=r"(ipsr));
    uint32_t exc = ipsr & 0x1FFu;
    uint32_t cfsr = SCB_CFSR, hfsr = SCB_HFSR;

    char *p = eo_put_str(msg, "edgeopt-mcu: fault: ");
    p = eo_put_str(p, eo_exception_name(exc));
    p = eo_put_str(p, " (exception ");
    p = eo_put_dec(p, exc);
    p = eo_put_str(p, ")");
    p = eo_put_fault_bits(p, cfsr, hfsr);
    p = eo_put_hex(p, ": pc=", frame[6]);
    p = eo_put_hex(p, " lr=", frame[5]);
    p = eo_put_hex(p, " sp=", (uint32_t)(uintptr_t)frame);
    p = eo_put_hex(p, " exc_return=", exc_return);
    p = eo_put_hex(p, " CFSR=", cfsr);
    p = eo_put_hex(p, " HFSR=", hfsr);
    p = eo_put_hex(p, " MMFAR=", SCB_MMFAR);
    p = eo_put_hex(p, " BFAR=", SCB_BFAR);
    p = eo_put_str(p, "\n");
    *p = '\0';
    eo_semihost(SYS_WRITE0, msg);
    _exit((int)(EO_FAULT_EXIT_BASE + (exc < 16 ? exc : 15u)));
}

/* Every exception enters here: pass the stacked frame (MSP or PSP) and EXC_RETURN on. */
__attribute__((naked)) static void eo_fault_entry(void)
{
    __asm__ volatile("tst lr, #4\n\t"
                     "ite eq\n\t"
                     "mrseq r0, msp\n\t"
                     "mrsne r0, psp\n\t"
                     "mov r1, lr\n\t"
                     "b eo_fault_report\n\t");
}

void NMI_Handler(void) __attribute__((weak, alias("eo_fault_entry")));
void HardFault_Handler(void) __attribute__((weak, alias("eo_fault_entry")));
void MemManage_Handler(void) __attribute__((weak, alias("eo_fault_entry")));
void BusFault_Handler(void) __attribute__((weak, alias("eo_fault_entry")));
void UsageFault_Handler(void) __attribute__((weak, alias("eo_fault_entry")));
void SVC_Handler(void) __attribute__((weak, alias("eo_fault_entry")));
void DebugMon_Handler(void) __attribute__((weak, alias("eo_fault_entry")));
void PendSV_Handler(void) __attribute__((weak, alias("eo_fault_entry")));
void SysTick_Handler(void) __attribute__((weak, alias("eo_fault_entry")));
void Default_Handler(void) __attribute__((weak, alias("eo_fault_entry")));

typedef void (*eo_handler)(void);

/* The initial stack pointer, then exceptions 1..15, then the board's external interrupts. */
struct eo_vector_table {
    void *initial_sp;
    eo_handler handlers[15 + EO_NUM_IRQ];
};

#define EO_IRQ4 Default_Handler, Default_Handler, Default_Handler, Default_Handler
#define EO_IRQ32 EO_IRQ4, EO_IRQ4, EO_IRQ4, EO_IRQ4, EO_IRQ4, EO_IRQ4, EO_IRQ4, EO_IRQ4

__attribute__((section(".isr_vector"), used)) const struct eo_vector_table eo_vectors = {
    &_estack,
    {
        Reset_Handler, NMI_Handler, HardFault_Handler, MemManage_Handler, BusFault_Handler,
        UsageFault_Handler, 0, 0, 0, 0, SVC_Handler, DebugMon_Handler, 0, PendSV_Handler,
        SysTick_Handler, EO_IRQ32,
    },
};
