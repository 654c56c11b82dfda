import json, glob, statistics
rows=[]
for f in sorted(glob.glob('/tmp/prec_results/*.json')):
    r=json.load(open(f))
    rows.append(r)
print("| model | noise | E per | fp32 | target | uniform E | uniform acc (3 other seeds) | learned E_mean | learned acc (3 other seeds) | saving | aJ/MAC uniform -> learned | learn s | total s |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['task']} | {r['noise']} | {'channel' if r['per_channel'] else 'layer'} | {r['fp32_metric']:.2f} | {r['target_metric']:.2f} | {r['uniform_energy']:.4g} | {r['uniform_metric']:.2f} ({statistics.fmean(r['uniform_metric_other_seeds']):.2f}) | {r['learned_energy']:.4g} | {r['learned_metric']:.2f} ({statistics.fmean(r['learned_metric_other_seeds']):.2f}) | **{100*r['energy_saving']:.1f} %** | {r['aj_per_mac_uniform']:.3g} -> {r['aj_per_mac_learned']:.3g} | {r['learning']['seconds']:.0f} | {r['seconds']:.0f} |")
