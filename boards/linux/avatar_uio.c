// SPDX-License-Identifier: GPL-2.0
/*
 * avatar_uio: the Avatar hypervisor's shared memory and the GIC distributor as
 * UIO devices, for the avatar-hw device model (docs/board-setup.md).
 *
 * Binds device-tree nodes with compatible "avatar,uio"; each node becomes one
 * /dev/uioN named after the node (without its unit address). Its maps, in order:
 *
 *   memory-region = <&a &b ...>  reserved-memory nodes, which must be "no-map":
 *                                RAM shared with the hypervisor's guests, mapped
 *                                cacheable (Normal write-back, the VMA's own
 *                                protection) so that the daemon and the guests,
 *                                which use their caches, see the same data;
 *   reg = <...>                  device registers (the GIC distributor), mapped
 *                                Device-nGnRE like the kernel's own ioremap();
 *                                RAM given by reg is refused;
 *   interrupts = <...>           optional: the doorbell. The handler masks the
 *                                line; userspace unmasks it by writing a 4-byte
 *                                1 to /dev/uioN (0 masks it), as with
 *                                uio_pdrv_genirq, which this driver does not need.
 *                                A node whose interrupts the kernel cannot give
 *                                is refused (without them UIO answers EIO).
 *
 * Map N is selected by mmap offset N * PAGE_SIZE and always covers the region
 * from its start; a map is never copy-on-write (MAP_PRIVATE on a writable
 * file) nor executable. A region that is not page aligned or not a whole
 * number of pages is refused at probe: it cannot be mapped without exposing
 * its neighbours.
 */

#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/ioport.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/of.h>
#include <linux/of_address.h>
#include <linux/of_reserved_mem.h>
#include <linux/platform_device.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/string.h>
#include <linux/uio_driver.h>
#include <linux/version.h>

#define DRIVER_NAME "avatar_uio"
#define AVATAR_UIO_IRQ_DISABLED 0

struct avatar_uio {
	struct uio_info info;
	struct device *dev;
	bool cacheable[MAX_UIO_MAPS];
	int nr_maps;
	spinlock_t lock;		/* guards flags against the handler */
	unsigned long flags;
};

static irqreturn_t avatar_uio_handler(int irq, struct uio_info *info)
{
	struct avatar_uio *priv = info->priv;

	/* Mask the line until userspace has seen the event and unmasks it. */
	spin_lock(&priv->lock);
	if (!__test_and_set_bit(AVATAR_UIO_IRQ_DISABLED, &priv->flags))
		disable_irq_nosync(irq);
	spin_unlock(&priv->lock);
	return IRQ_HANDLED;
}

static int avatar_uio_irqcontrol(struct uio_info *info, s32 irq_on)
{
	struct avatar_uio *priv = info->priv;
	unsigned long flags;

	spin_lock_irqsave(&priv->lock, flags);
	if (irq_on) {
		if (__test_and_clear_bit(AVATAR_UIO_IRQ_DISABLED, &priv->flags))
			enable_irq(info->irq);
	} else {
		if (!__test_and_set_bit(AVATAR_UIO_IRQ_DISABLED, &priv->flags))
			disable_irq_nosync(info->irq);
	}
	spin_unlock_irqrestore(&priv->lock, flags);
	return 0;
}

static void avatar_uio_clear_mayexec(struct vm_area_struct *vma)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 3, 0)
	vm_flags_clear(vma, VM_MAYEXEC);
#else
	vma->vm_flags &= ~VM_MAYEXEC;
#endif
}

/* The memory type of a user mapping's protection: its MAIR index (arm64 memory.h MT_*). */
static const char *avatar_uio_memory_type(pgprot_t prot)
{
#ifdef CONFIG_ARM64
	switch (pgprot_val(prot) & PTE_ATTRINDX_MASK) {
	case PTE_ATTRINDX(MT_NORMAL):
		return "MT_NORMAL (Normal write-back)";
	case PTE_ATTRINDX(MT_NORMAL_TAGGED):
		return "MT_NORMAL_TAGGED (Normal write-back, tagged)";
	case PTE_ATTRINDX(MT_NORMAL_NC):
		return "MT_NORMAL_NC (Normal non-cacheable)";
	case PTE_ATTRINDX(MT_DEVICE_nGnRnE):
		return "MT_DEVICE_nGnRnE (Device-nGnRnE)";
	case PTE_ATTRINDX(MT_DEVICE_nGnRE):
		return "MT_DEVICE_nGnRE (Device-nGnRE)";
	}
	return "an unknown memory type";
#else
	return "memory type not decoded on this architecture";
#endif
}

static int avatar_uio_mmap(struct uio_info *info, struct vm_area_struct *vma)
{
	struct avatar_uio *priv = info->priv;
	unsigned long index = vma->vm_pgoff;
	unsigned long size = vma->vm_end - vma->vm_start;
	struct uio_mem *mem;

	/* The UIO core checks this too; userspace is less trusted than we are. */
	if (index >= priv->nr_maps)
		return -EINVAL;
	mem = &info->mem[index];
	if (vma->vm_end <= vma->vm_start || size > mem->size)
		return -EINVAL;
	/* A copy-on-write (private, writable) map would let writes miss the shared memory. */
	if (is_cow_mapping(vma->vm_flags))
		return -EINVAL;
	/* Neither guest RAM nor registers are ever code for the daemon. */
	if (vma->vm_flags & VM_EXEC)
		return -EPERM;
	avatar_uio_clear_mayexec(vma);

	if (!priv->cacheable[index])
		vma->vm_page_prot = pgprot_device(vma->vm_page_prot);
	/* Decoded from the very protection the page-table entries get (dyndbg: board-setup.md). */
	dev_dbg(priv->dev, "%s: mmap of map %lu: 0x%lx bytes, %s\n", info->name, index, size,
		avatar_uio_memory_type(vma->vm_page_prot));
	return remap_pfn_range(vma, vma->vm_start, PHYS_PFN(mem->addr), size,
			       vma->vm_page_prot);
}

/* Add one map; refuse (one line naming the node) what cannot be mapped exactly. */
static int avatar_uio_add_map(struct avatar_uio *priv, struct device_node *np,
			      const char *what, phys_addr_t start, resource_size_t size,
			      bool cacheable)
{
	struct uio_mem *mem;
	phys_addr_t end = start + size - 1;

	if (priv->nr_maps >= MAX_UIO_MAPS) {
		dev_err(priv->dev, "%pOF: more than %d memory-region and reg entries\n",
			np, MAX_UIO_MAPS);
		return -EINVAL;
	}
	if (!size || !PAGE_ALIGNED(start) || !PAGE_ALIGNED(size)) {
		dev_err(priv->dev,
			"%pOF: %s %pa size %pa is not page aligned or not a whole number of %lu-byte pages, cannot map it (a 4 KiB region cannot be mapped on a kernel with bigger pages)\n",
			np, what, &start, &size, PAGE_SIZE);
		return -EINVAL;
	}
	mem = &priv->info.mem[priv->nr_maps];
	mem->name = priv->info.name;
	mem->addr = start;
	mem->offs = 0;
	mem->size = size;
	mem->memtype = UIO_MEM_PHYS;
	priv->cacheable[priv->nr_maps] = cacheable;
	dev_info(priv->dev, "%s: map %d: %pa-%pa (%llu KiB) %s\n", priv->info.name,
		 priv->nr_maps, &start, &end, (unsigned long long)size >> 10,
		 cacheable ? "cacheable (Normal write-back)" : "uncached (Device-nGnRE)");
	priv->nr_maps++;
	return 0;
}

static int avatar_uio_add_memory_regions(struct avatar_uio *priv, struct device_node *np)
{
	int count = of_count_phandle_with_args(np, "memory-region", NULL);
	int i, ret;

	for (i = 0; i < count; i++) {
		struct device_node *rnp = of_parse_phandle(np, "memory-region", i);
		struct reserved_mem *rmem;
		bool no_map;

		if (!rnp) {
			dev_err(priv->dev, "%pOF: memory-region %d is not a node\n", np, i);
			return -EINVAL;
		}
		no_map = of_property_read_bool(rnp, "no-map");
		rmem = of_reserved_mem_lookup(rnp);
		if (!no_map || !rmem) {
			dev_err(priv->dev, "%pOF: memory-region %d (%pOF) %s\n", np, i, rnp,
				!no_map ? "lacks no-map: Linux itself could use that memory" :
				"is not reserved memory known at boot (load the overlay from config.txt)");
			of_node_put(rnp);
			return -EINVAL;
		}
		of_node_put(rnp);
		ret = avatar_uio_add_map(priv, np, "memory-region", rmem->base, rmem->size, true);
		if (ret)
			return ret;
	}
	return 0;
}

/*
 * True if @res overlaps RAM: System RAM in the resource tree (/proc/iomem), or a reserved-memory
 * region (no-map RAM is "reserved" there, not System RAM). Not pfn_valid(): with SPARSEMEM it is
 * true for every page of a section (128 MiB on arm64 with 4 KiB pages) that holds any RAM, such
 * as the Pi 4's distributor at 0xff841000 beside RAM that ends at 0xfbffffff.
 */
static bool avatar_uio_is_ram(struct resource *res)
{
	struct device_node *reserved = of_find_node_by_path("/reserved-memory");
	struct device_node *np;
	struct resource r;
	bool ram = region_intersects(res->start, resource_size(res), IORESOURCE_SYSTEM_RAM,
				     IORES_DESC_NONE) != REGION_DISJOINT;
	int i;

	for_each_child_of_node(reserved, np) {
		for (i = 0; !ram && !of_address_to_resource(np, i, &r); i++)
			ram = resource_overlaps(&r, res);
		if (ram) {
			of_node_put(np);
			break;
		}
	}
	of_node_put(reserved);
	return ram;
}

static int avatar_uio_add_registers(struct avatar_uio *priv, struct platform_device *pdev)
{
	struct resource *res;
	int i, ret;

	for (i = 0; (res = platform_get_resource(pdev, IORESOURCE_MEM, i)); i++) {
		/* RAM mapped Device here would alias the cacheable mappings of it. */
		if (resource_size(res) && avatar_uio_is_ram(res)) {
			dev_err(priv->dev,
				"%pOF: reg %pR is RAM: give RAM by memory-region (mapped cacheable), not reg (mapped Device)\n",
				pdev->dev.of_node, res);
			return -EINVAL;
		}
		ret = avatar_uio_add_map(priv, pdev->dev.of_node, "reg", res->start,
					 resource_size(res), false);
		if (ret)
			return ret;
	}
	return 0;
}

static int avatar_uio_probe(struct platform_device *pdev)
{
	struct device *dev = &pdev->dev;
	struct device_node *np = dev->of_node;
	const char *node_name = kbasename(np->full_name);
	struct avatar_uio *priv;
	int irq, ret;

	priv = devm_kzalloc(dev, sizeof(*priv), GFP_KERNEL);
	if (!priv)
		return -ENOMEM;
	priv->dev = dev;
	spin_lock_init(&priv->lock);
	/* "avatar-trap@40000000" and "avatar-trap" both give UIO name "avatar-trap". */
	priv->info.name = devm_kasprintf(dev, GFP_KERNEL, "%.*s", (int)strcspn(node_name, "@"),
					 node_name);
	if (!priv->info.name)
		return -ENOMEM;
	priv->info.version = "1";
	priv->info.priv = priv;
	priv->info.mmap = avatar_uio_mmap;

	ret = avatar_uio_add_memory_regions(priv, np);
	if (ret)
		return ret;
	ret = avatar_uio_add_registers(priv, pdev);
	if (ret)
		return ret;
	if (!priv->nr_maps) {
		dev_err(dev, "%pOF: neither memory-region nor reg: nothing to map\n", np);
		return -EINVAL;
	}

	irq = platform_get_irq_optional(pdev, 0);
	if (irq > 0) {
		priv->info.irq = irq;
		priv->info.handler = avatar_uio_handler;
		priv->info.irqcontrol = avatar_uio_irqcontrol;
	} else if (irq == -EPROBE_DEFER || of_find_property(np, "interrupts", NULL) ||
		   of_find_property(np, "interrupts-extended", NULL)) {
		/* A doorbell that cannot be had: without it the daemon would get EIO, not events. */
		return dev_err_probe(dev, irq,
				     "%pOF: its interrupt cannot be had: check the specifier against the interrupt controller's #interrupt-cells and lines\n",
				     np);
	} else {
		priv->info.irq = UIO_IRQ_NONE;
	}

	ret = devm_uio_register_device(dev, &priv->info);
	if (ret)
		dev_err(dev, "%pOF: registering the UIO device failed: %d\n", np, ret);
	return ret;
}

static const struct of_device_id avatar_uio_of_match[] = {
	{ .compatible = "avatar,uio" },
	{ }
};
MODULE_DEVICE_TABLE(of, avatar_uio_of_match);

static struct platform_driver avatar_uio_driver = {
	.probe = avatar_uio_probe,
	.driver = {
		.name = DRIVER_NAME,
		.of_match_table = avatar_uio_of_match,
	},
};
module_platform_driver(avatar_uio_driver);

MODULE_DESCRIPTION("Avatar hypervisor shared memory (cacheable) and GIC distributor as UIO devices");
MODULE_AUTHOR("avatar-hw");
MODULE_LICENSE("GPL");
