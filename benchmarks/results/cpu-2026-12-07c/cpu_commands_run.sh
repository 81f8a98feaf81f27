#!/usr/bin/env bash
# issue 16 part 2: each remaining family's CPU command as it is and with a higher lr, one after the other
cd /work/main
export GENPIPE_HOME=/tmp/cpuhome16
for pair in vae:3e-3 beta_vae:3e-3 realnvp:3e-3 wgan_gp:5e-4 stylegan:2e-3 conv_vae:3e-3 pixelcnn:3e-3 ebm:3e-4 wgan:5e-4 ddpm:2e-3; do
  f=${pair%%:*}; lr=${pair##*:}
  echo "$(date +%T) start $f lr=$lr" >> /work/b16/status
  .venv/bin/python benchmarks/cpu_commands.py --change model.lr=$lr $f > /work/b16/$f.log 2>&1
  echo "$(date +%T) end $f rc=$?" >> /work/b16/status
done
.venv/bin/genpipe head stop
